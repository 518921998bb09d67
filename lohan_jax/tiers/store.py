"""The NVMe tier: per-unit fp32 master weights and Adam moments in TensorStore (zarr3 on a local `file`
kvstore), read ahead of a block's update and written back behind it.

Each unit's state is one float32 array [3, n] (master, mu, nu) chunked along n, every chunk carrying a
crc32c digest; a missing chunk is an error (never zeros), a corrupt one fails its digest. A write goes to a
new generation directory and replaces the old one only once complete, so a failed write (a full disk) leaves
the last good state readable; the extra space is one unit per write in flight.
"""
from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

CHUNK_ELEMS = 16 << 20  # 3 x 16M fp32 = 192 MiB per chunk; MACHINE.md: 1.75 GB/s write in 64 MiB+ chunks


class StoreError(RuntimeError):
    """A unit's state on disk is missing, corrupt or could not be written; the message names it."""


@dataclasses.dataclass
class DiskCounters:
    bytes_read: int = 0
    bytes_written: int = 0
    read_s: float = 0.0
    write_s: float = 0.0


class StateStore:
    def __init__(self, root: str | Path, *, io_concurrency: int = 8, max_writes_in_flight: int = 2,
                 timeline: Any = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._context = ts.Context({"file_io_concurrency": {"limit": io_concurrency}})
        self._gen: dict[str, int] = {}
        self._n: dict[str, int] = {}
        self._lock = threading.Lock()
        self.counters = DiskCounters()
        self._timeline = timeline
        # Backpressure: each write in flight holds its [3, n] staging array and TensorStore's encoded chunks;
        # without a bound a slow disk lets them pile up (12 x 7.5 GB for 13B blocks: the host OOM of 2026-11-25).
        self._write_slots = threading.BoundedSemaphore(max_writes_in_flight)
        self.max_writes_in_flight = max_writes_in_flight

    # ---- capacity --------------------------------------------------------------------------------------
    @staticmethod
    def check_capacity(root: str | Path, need_bytes: int, margin: float = 0.05) -> None:
        """Refuse before writing anything when the disk cannot hold the state (plus a margin)."""
        root = Path(root)
        probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        if need_bytes * (1 + margin) > free:
            raise StoreError(f"disk at {root} has {free / 2**30:.1f} GiB free but the plan puts "
                             f"{need_bytes / 2**30:.1f} GiB of optimizer state there (+{margin:.0%} margin): "
                             f"free {(need_bytes * (1 + margin) - free) / 2**30:.1f} GiB more, choose another "
                             "offload.disk_path, or keep more state in host memory or HBM")

    # ---- arrays ----------------------------------------------------------------------------------------
    def _spec(self, name: str, gen: int, n: int | None = None) -> dict:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.root / name / f"gen{gen}")},
                "fill_missing_data_reads": False}
        if n is not None:
            spec["metadata"] = {
                "shape": [3, n], "data_type": "float32",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [3, min(n, CHUNK_ELEMS)]}},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}
        return spec

    def write(self, name: str, state: np.ndarray) -> ts.Future:
        """Asynchronously write [3, n] fp32 state as the unit's next generation; the old one is removed once
        the new one is complete. Returns a future whose result() raises StoreError on failure."""
        with self._lock:
            gen = self._gen.get(name, -1) + 1
        n = state.shape[1]
        self._write_slots.acquire()  # blocks the caller (the optimizer worker) while the disk catches up
        t0 = time.perf_counter()
        try:
            arr = ts.open(self._spec(name, gen, n), create=True, delete_existing=True, context=self._context).result()
            fut = arr.write(state)
        except Exception as e:
            self._write_slots.release()
            raise StoreError(f"writing the optimizer state of {name} to {self.root / name} failed: {e}") from e
        finished = threading.Event()  # set after the bookkeeping below, so done() implies the new generation

        def done(f):
            self._write_slots.release()
            try:
                f.result()
            except Exception:  # keep the old generation; result() reports the error to the waiter
                finished.set()
                return
            with self._lock:
                old, self._gen[name], self._n[name] = self._gen.get(name), gen, n
                self.counters.bytes_written += state.nbytes
                self.counters.write_s += time.perf_counter() - t0
            if self._timeline is not None:
                self._timeline.add("disk", f"write:{name}", t0, time.perf_counter(), bytes=state.nbytes)
            if old is not None:
                shutil.rmtree(self.root / name / f"gen{old}", ignore_errors=True)
            finished.set()

        fut.add_done_callback(done)
        return _Checked(fut, f"writing the optimizer state of {name} to {self.root / name}", finished)

    def read(self, name: str) -> _Checked:
        """Asynchronously read the unit's current state; result() is the [3, n] array or a StoreError."""
        with self._lock:
            if name not in self._gen:
                raise StoreError(f"no optimizer state of {name} in {self.root}")
            gen = self._gen[name]
        t0 = time.perf_counter()
        try:
            arr = ts.open(self._spec(name, gen), context=self._context).result()
        except Exception as e:
            raise StoreError(f"optimizer state of {name} at {self.root / name / f'gen{gen}'} is unreadable: {e}")
        fut = arr.read()

        def done(f):
            try:
                nbytes = f.result().nbytes
            except Exception:
                return
            with self._lock:
                self.counters.bytes_read += nbytes
                self.counters.read_s += time.perf_counter() - t0
            if self._timeline is not None:
                self._timeline.add("disk", f"read:{name}", t0, time.perf_counter(), bytes=nbytes)

        fut.add_done_callback(done)
        return _Checked(fut, f"reading the optimizer state of {name} from {self.root / name / f'gen{gen}'}")

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())


class _Checked:
    """A TensorStore future whose failure becomes a StoreError naming the unit and the path. With `finished`,
    done() and result() also wait for the completion callback (a write's generation switch)."""

    def __init__(self, fut: Any, what: str, finished: threading.Event | None = None):
        self._fut, self._what, self._finished = fut, what, finished

    def done(self) -> bool:
        return self._fut.done() and (self._finished is None or self._finished.is_set())

    def result(self) -> Any:
        if self._finished is not None:
            self._finished.wait()
        try:
            return self._fut.result()
        except Exception as e:
            raise StoreError(f"{self._what} failed: {e}") from e
