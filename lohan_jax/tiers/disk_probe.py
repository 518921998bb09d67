"""The disk's own rate, without TensorStore: sequential direct-I/O write, read, and both at once (the step's
traffic: the state of one unit read while another's is written back). The raw figure the store's GB/s is
judged against (bench_step's disk_gbps_achieved, experiments/store_bench.py)."""
from __future__ import annotations

import concurrent.futures
import mmap
import os
import time
from pathlib import Path

BLOCK_BYTES = 64 << 20  # one request; page-aligned (mmap), as O_DIRECT needs
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def measure_raw_disk(path: str | Path, gib: float) -> dict[str, float]:
    """GB/s of `gib` GiB (at least one 64 MiB block) under `path`, each file fsynced: disk_raw_write_gbps,
    disk_raw_read_gbps (the file just written), disk_raw_mixed_gbps (that file read by one thread while a
    second file of the same size is written by another; bytes both ways over the wall time)."""
    n = max(1, int(gib * 2**30 / BLOCK_BYTES))
    a, b = Path(path) / "raw_disk_probe_a.bin", Path(path) / "raw_disk_probe_b.bin"
    bufs = [mmap.mmap(-1, BLOCK_BYTES) for _ in range(2)]
    for buf in bufs:
        buf.write(os.urandom(1 << 20) * (BLOCK_BYTES >> 20))
    nbytes = n * BLOCK_BYTES
    try:
        write_s = _timed(_write, a, bufs[0], n)
        read_s = _timed(_read, a, bufs[0], n)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # os.write/readv release the GIL
            jobs = [pool.submit(_read, a, bufs[0], n), pool.submit(_write, b, bufs[1], n)]
            for job in jobs:
                job.result()
        mixed_s = time.perf_counter() - t0
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
    return {"disk_raw_write_gbps": nbytes / write_s / 1e9, "disk_raw_read_gbps": nbytes / read_s / 1e9,
            "disk_raw_mixed_gbps": 2 * nbytes / mixed_s / 1e9}


def direct_io_supported(path: str | Path) -> bool:
    """Whether a file under `path` can be written and read with O_DIRECT (tmpfs before Linux 6.6 cannot)."""
    f = Path(path) / f".direct-io-probe-{os.getpid()}"
    buf = mmap.mmap(-1, 4096)
    try:
        _write(f, buf, 1)
        _read(f, buf, 1)
        return bool(_O_DIRECT)
    except OSError:
        return False
    finally:
        f.unlink(missing_ok=True)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _write(f: Path, buf: mmap.mmap, n: int) -> None:
    fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | _O_DIRECT, 0o600)
    try:
        for _ in range(n):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(f: Path, buf: mmap.mmap, n: int) -> None:
    fd = os.open(f, os.O_RDONLY | _O_DIRECT)
    try:
        for _ in range(n):
            os.readv(fd, [buf])
    finally:
        os.close(fd)
