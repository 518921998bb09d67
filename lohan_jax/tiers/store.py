"""The NVMe tier: per-unit fp32 master weights and Adam moments in TensorStore (zarr3 on a local `file`
kvstore), read ahead of a block's update and written back behind it.

Each unit's state is one float32 array [3, n] (master, mu, nu) chunked along n, every chunk carrying a
crc32c digest; a missing chunk is an error (never zeros), a corrupt one fails its digest. A write goes to a
new generation directory and replaces the old one only once complete, so a failed write (a full disk) leaves
the last good state readable (the failed generation is removed); the extra space is one unit per write in
flight. Files are never modified in place (TensorStore writes a chunk to a temporary file and renames it),
so a checkpoint may hard-link a generation (`pin` keeps it past the next write) and a restore may `adopt`
a checkpoint's files as the next generation without copying a byte.

I/O modes (`io_mode`): "default" goes through the page cache (TensorStore's buffered file I/O, fsync per
file). "direct" keeps the state out of the page cache, as far as TensorStore 0.1.86 allows: its `file_io_mode`
direct applies O_DIRECT to reads only, and only to files whose size is a whole number of 4 KiB pages (else it
reads through the cache without a word; strace-checked), so chunks are sized to make every chunk file aligned;
its writes stay buffered, so each chunk's pages are dropped (posix_fadvise) once the chunk is durable.

The store is scratch: what survives a crash is the checkpoint. Opening a root therefore removes the unit
generations a killed run left behind, after taking an exclusive lock on the root (two live runs sharing
one offload.disk_path would overwrite each other's state).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from lohan_jax import faults

CHUNK_ELEMS = 16 << 20  # 3 x 16M fp32 = 192 MiB per chunk; MACHINE.md: 1.75 GB/s write in 64 MiB+ chunks
IO_MODES = ("default", "direct")  # offload.disk_io_mode (the module docstring says what each does)
_PAGE = 4096  # O_DIRECT alignment TensorStore asks of a file's size (512-byte multiples are read buffered)


class StoreError(RuntimeError):
    """A unit's state on disk is missing, corrupt or could not be written; the message names it."""


@dataclasses.dataclass
class DiskCounters:
    bytes_read: int = 0
    bytes_written: int = 0
    read_s: float = 0.0
    write_s: float = 0.0


class StateStore:
    def __init__(self, root: str | Path, *, io_concurrency: int = 8, io_mode: str = "default",
                 max_writes_in_flight: int = 2, timeline: Any = None):
        if io_mode not in IO_MODES:
            raise ValueError(f"StateStore io_mode={io_mode!r} must be one of {', '.join(IO_MODES)} "
                             "(offload.disk_io_mode)")
        if io_concurrency < 1:
            raise ValueError(f"StateStore io_concurrency={io_concurrency!r} must be >= 1")
        self.root, self.io_mode = Path(root), io_mode
        _lock_root(self.root)
        _remove_stale_generations(self.root)
        self._pins: dict[tuple[str, int], int] = {}
        self._issued: dict[str, int] = {}
        # file_io_sync stays on (TensorStore's default): checkpoints hard-link these files, so they must be durable
        self._context = ts.Context({"file_io_concurrency": {"limit": io_concurrency},
                                    "file_io_mode": {"mode": io_mode}})
        self._gen: dict[str, int] = {}
        self._n: dict[str, int] = {}
        self._lock = threading.Lock()
        self.counters = DiskCounters()
        self._timeline = timeline
        # Backpressure: each write in flight holds its [3, n] staging array and TensorStore's encoded chunks;
        # without a bound a slow disk lets them pile up (12 x 7.5 GB for 13B blocks: the host OOM of 2026-11-25).
        self._write_slots = threading.BoundedSemaphore(max_writes_in_flight)
        self._writer = concurrent.futures.ThreadPoolExecutor(max_writes_in_flight, thread_name_prefix="lohan-store")
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
    def chunk_elems(self, n: int) -> int:
        """Elements per chunk of a [3, n] unit. In direct mode a chunk file (12 bytes an element plus the 4-byte
        crc32c; edge chunks are stored whole) is a multiple of 4 KiB: 12 c + 4 = 4096 k, i.e. c = 341 mod 1024."""
        c = min(n, CHUNK_ELEMS)
        if self.io_mode == "direct":
            first, step = (_PAGE - 4) // 12, _PAGE // 4  # 341, 1024
            c = first + step * max(0, -(-(c - first) // step))
        return c

    def _spec(self, name: str, gen: int, n: int | None = None) -> dict:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.root / name / f"gen{gen}")},
                "fill_missing_data_reads": False}
        if n is not None:
            spec["metadata"] = {
                "shape": [3, n], "data_type": "float32",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [3, self.chunk_elems(n)]}},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}
        return spec

    def write(self, name: str, state: np.ndarray) -> ts.Future:
        """Asynchronously write [3, n] fp32 state as the unit's next generation; the old one is removed once
        the new one is complete. Returns a future whose result() raises StoreError on failure."""
        with self._lock:  # numbered at issue: two writes in flight never share (or delete) a directory
            gen = self._issued[name] = max(self._issued.get(name, -1), self._gen.get(name, -1)) + 1
        n, nbytes = state.shape[1], state.nbytes
        self._write_slots.acquire()  # blocks the caller (the optimizer worker) while the disk catches up
        t0 = time.perf_counter()
        try:
            arr = ts.open(self._spec(name, gen, n), create=True, delete_existing=True, context=self._context).result()
            drop = (self.root / name / f"gen{gen}" / "c" / "0") if self.io_mode == "direct" else None
            fut = self._writer.submit(_write_by_chunks, arr, state, self.chunk_elems(n), drop)
            if faults.hit("disk_write") == "enospc":  # (kill: the process dies with this write in flight)
                fut.result()
                fut = _Failed(faults.disk_full(f"writing {self.root / name / f'gen{gen}'}"))
        except Exception as e:
            self._write_slots.release()
            shutil.rmtree(self.root / name / f"gen{gen}", ignore_errors=True)
            raise StoreError(f"writing the optimizer state of {name} to {self.root / name} failed: {e}") from e
        finished = threading.Event()  # set after the bookkeeping below, so done() implies the new generation

        def done(f):
            self._write_slots.release()
            try:
                f.result()
            except Exception:  # keep the old generation; result() reports the error to the waiter
                shutil.rmtree(self.root / name / f"gen{gen}", ignore_errors=True)  # and give back its space
                finished.set()
                return
            with self._lock:
                old = self._gen.get(name)
                if old is not None and old > gen:  # a later write landed first: this one is stale
                    old = gen
                else:
                    self._gen[name], self._n[name] = gen, n
                self.counters.bytes_written += nbytes
                self.counters.write_s += time.perf_counter() - t0
            if self._timeline is not None:
                self._timeline.add("disk", f"write:{name}", t0, time.perf_counter(), bytes=nbytes)
            if old is not None:
                self._retire(name, old)
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
            raise StoreError(f"optimizer state of {name} at {self.root / name / f'gen{gen}'} is unreadable: {e}") from e
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

    # ---- generations shared with checkpoints -----------------------------------------------------------
    def pin(self, name: str) -> tuple[Path, int]:
        """The directory of the unit's current generation, kept on disk (past the next write) until `unpin`.
        The caller must have waited for the unit's pending write."""
        with self._lock:
            if name not in self._gen:
                raise StoreError(f"no optimizer state of {name} in {self.root}")
            gen = self._gen[name]
            self._pins[(name, gen)] = self._pins.get((name, gen), 0) + 1
        return self.root / name / f"gen{gen}", gen

    def unpin(self, name: str, gen: int) -> None:
        with self._lock:
            left = self._pins[(name, gen)] - 1
            if left:
                self._pins[(name, gen)] = left
                return
            del self._pins[(name, gen)]
            retired = self._gen.get(name) != gen
        if retired:
            shutil.rmtree(self.root / name / f"gen{gen}", ignore_errors=True)

    def _retire(self, name: str, gen: int) -> None:
        with self._lock:
            if (name, gen) in self._pins:
                return  # unpin removes it
        shutil.rmtree(self.root / name / f"gen{gen}", ignore_errors=True)

    def adopt(self, name: str, source: str | Path) -> None:
        """Make the zarr3 [3, n] array at `source` (a checkpoint's copy of this unit) the unit's next
        generation: hard-linked where the filesystem allows it, else copied file by file."""
        source = Path(source)
        try:
            n = int(json.loads((source / "zarr.json").read_text())["shape"][1])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise StoreError(f"cannot adopt {source} as the state of {name}: unreadable zarr.json ({e})") from None
        with self._lock:
            old = self._gen.get(name)
            gen = self._issued[name] = max(self._issued.get(name, -1), -1 if old is None else old) + 1
        target = self.root / name / f"gen{gen}"
        shutil.rmtree(target, ignore_errors=True)
        try:
            link_or_copy_tree(source, target)
        except OSError as e:
            shutil.rmtree(target, ignore_errors=True)
            raise StoreError(f"adopting {source} as the state of {name} in {target} failed: {e}") from e
        with self._lock:
            self._gen[name], self._n[name] = gen, n
        if old is not None:
            self._retire(name, old)


def link_or_copy_tree(source: Path, target: Path) -> int:
    """Recreate the directory tree `source` at `target`, hard-linking each file (copying it when the two
    are on different filesystems). Returns the bytes copied (0 when everything was linked)."""
    copied = 0
    for dirpath, _, files in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            src, dst = Path(dirpath) / f, target / rel / f
            try:
                os.link(src, dst)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(src, dst)
                copied += dst.stat().st_size
    return copied


_GENERATION = re.compile(r"gen\d+")
_LOCKS: dict[str, Any] = {}  # root -> its open lock file, for the life of the process


def _lock_root(root: Path) -> None:
    """An exclusive POSIX record lock on root/.lock: a second process is refused; this process may open the
    root again (an engine built after an earlier one in the same process, tests, notebooks)."""
    key = os.path.realpath(root)
    if key in _LOCKS:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        f = open(root / ".lock", "a+")  # noqa: SIM115 (held for the life of the process)
    except OSError as e:
        raise StoreError(f"offload.disk_path={str(root)!r} is not a writable directory: {e}") from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreError(f"offload.disk_path={str(root)!r} is in use by another running process; give each run "
                         "its own directory") from None
    _LOCKS[key] = f


def _remove_stale_generations(root: Path) -> None:
    """Unit generations of an earlier (killed) process: only `<unit>/gen<k>` directories holding a zarr
    array are removed, so a mistyped disk_path never loses anything else."""
    for unit in root.iterdir():
        if unit.is_dir():
            for gen in unit.iterdir():
                if _GENERATION.fullmatch(gen.name) and gen.is_dir() and (gen / "zarr.json").exists():
                    shutil.rmtree(gen, ignore_errors=True)


def _write_by_chunks(arr: Any, state: np.ndarray, chunk: int, drop_dir: Path | None = None,
                     outstanding: int = 4) -> None:
    """Write chunk by chunk with a few chunk writes in flight: TensorStore copies (and encodes) only the chunks
    in flight. A whole-array write copies all of it at once: with a 13B block's 3.8 GB of state and two writes
    in flight that was ~15 GB more host memory than planned, and the run of 2026-11-25 was OOM-killed.
    With `drop_dir` (zarr3's default chunk keys: c/0/<j>), each chunk file leaves the page cache once durable."""
    n = state.shape[1]
    pending: list[tuple[int, Any]] = []

    def finish(j: int, f: Any) -> None:
        f.result()
        if drop_dir is not None:
            drop_cached_pages(drop_dir / str(j))

    for j, lo in enumerate(range(0, n, chunk)):
        if len(pending) >= outstanding:
            finish(*pending.pop(0))
        hi = min(n, lo + chunk)
        pending.append((j, arr[:, lo:hi].write(state[:, lo:hi])))
    for j, f in pending:
        finish(j, f)


def drop_cached_pages(path: str | Path) -> None:
    """Drop a file's (or every file's under a directory) clean pages from the page cache; best effort."""
    path = Path(path)
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Failed:
    """A completed future that failed (an injected fault), with TensorStore's future interface."""

    def __init__(self, error: BaseException):
        self._error = error

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        raise self._error

    def add_done_callback(self, fn) -> None:
        fn(self)


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
