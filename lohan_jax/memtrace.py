"""Host memory over time: a sampler thread writing JSON lines of this process's RSS split (anonymous, file,
shared) and the machine's available, dirty and write-back memory, tagged with the phase the caller sets.

Why: the kernel's OOM killer ends a run without a traceback; a trace that is flushed line by line survives it
and says which phase grew and by what kind of memory (pinned CUDA memory, numpy arrays, page cache).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

_STATUS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmLck", "VmPin")
_MEMINFO = ("MemAvailable", "Cached", "Dirty", "Writeback", "Mlocked", "Shmem", "AnonPages")


def _read_kib(path: str, keys: tuple[str, ...]) -> dict[str, float]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in keys:
                    out[k] = int(rest.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return out


def snapshot() -> dict[str, float]:
    """GiB: this process's RSS parts (/proc/self/status) and the machine's memory (/proc/meminfo)."""
    snap = _read_kib("/proc/self/status", _STATUS)
    snap.update({f"sys_{k}": v for k, v in _read_kib("/proc/meminfo", _MEMINFO).items()})
    return snap


class MemTrace:
    """`with MemTrace(path, every_s=2) as mt: mt.phase = "step 0"; ...` samples until the block ends."""

    def __init__(self, path: str | Path, every_s: float = 2.0):
        self.path, self.every_s, self.phase = Path(path), every_s, "start"
        self.peak_rss_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lohan-memtrace", daemon=True)

    def __enter__(self) -> MemTrace:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def sample(self) -> dict:
        row = {"t": round(time.perf_counter() - self._t0, 2), "phase": self.phase,
               **{k: round(v, 3) for k, v in snapshot().items()}}
        self.peak_rss_gib = max(self.peak_rss_gib, row.get("VmRSS", 0.0))
        with open(self.path, "a") as f:  # one line at a time: survives a SIGKILL
            f.write(json.dumps(row) + "\n")
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()
