"""Question: how fast does the StateStore (the disk tier) move optimizer state on this disk, for each
io_mode x io_concurrency, against the disk's raw direct-I/O rate measured in the same run?

Per variant: write K units of U GiB, read them back (page cache dropped first), then the engine's pipeline:
unit k's state written back while unit k+1's is read (DISK_READ_WINDOW reads ahead, DISK_WRITES_IN_FLIGHT
writes in flight, as lohan_jax.engine runs them). Appends one row per variant and one raw row (experiment
store_bench) to --out, prints a table, and prints the best variant (highest mixed GB/s) as its last line:

  PYTHONPATH=. python experiments/store_bench.py --path /mnt/nvme/sb
  ...
  best: io_mode=direct io_concurrency=32
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="a directory on the disk to measure (removed variant by variant)")
    p.add_argument("--units", type=int, default=4, help="K: units written, read, then pipelined")
    p.add_argument("--unit-gib", type=float, default=1.0,
                   help="U: GiB of [3, n] fp32 state per unit (above one chunk, rounded to whole 192 MiB chunks)")
    p.add_argument("--io-modes", default="default,direct")
    p.add_argument("--io-concurrency", default="8,32")
    p.add_argument("--raw-gib", type=float, default=1.0, help="GiB of the raw direct-I/O probe (0: skip it)")
    p.add_argument("--out", default="experiments/results/store_bench.jsonl")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np

    from lohan_jax.metrics import append_result
    from lohan_jax.tiers.disk_probe import measure_raw_disk

    root = Path(args.path)
    root.mkdir(parents=True, exist_ok=True)
    from lohan_jax.tiers.store import CHUNK_ELEMS

    n = max(1, int(args.unit_gib * 2**30 / 12))
    if n > CHUNK_ELEMS:  # whole chunks: a padded edge chunk's bytes would count against the store
        n = round(n / CHUNK_ELEMS) * CHUNK_ELEMS
    state = np.random.default_rng(0).random((3, n), dtype=np.float32)
    # device: the disk (asking jax for its device would start the GPU backend for nothing)
    base = {"experiment": "store_bench", "system": "lohan_jax", "device": _describe_disk(root), "units": args.units,
            "unit_bytes": state.nbytes, "command": " ".join(["python", *sys.argv])}
    raw = measure_raw_disk(root, args.raw_gib) if args.raw_gib else {}
    if raw:
        append_result(args.out, {**base, "variant": "raw", **raw, "status": "ok"})
    rows = []
    for mode in args.io_modes.split(","):
        for conc in (int(c) for c in args.io_concurrency.split(",")):
            row = {**base, "variant": f"{mode}-c{conc}", "io_mode": mode, "io_concurrency": conc}
            try:
                row.update(_measure_store(root / f"{mode}-c{conc}", state, args.units, mode, conc), status="ok")
                if raw.get("disk_raw_mixed_gbps"):
                    row["disk_fraction_of_raw"] = row["store_mixed_gbps"] / raw["disk_raw_mixed_gbps"]
            except Exception as e:  # a failed variant is a result too (e.g. no O_DIRECT on this filesystem)
                row.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
            rows.append(append_result(args.out, row))
    print(_table(raw, rows))
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return 1
    best = max(ok, key=lambda r: r["store_mixed_gbps"])
    print(f"best: io_mode={best['io_mode']} io_concurrency={best['io_concurrency']}")
    return 0


def _measure_store(path: Path, state, k: int, io_mode: str, io_concurrency: int) -> dict:
    """GB/s of the store's write, read and write-while-read on k units of `state` under `path`."""
    import numpy as np

    from lohan_jax.plan_memory import DISK_READ_WINDOW, DISK_WRITES_IN_FLIGHT
    from lohan_jax.tiers.store import StateStore, drop_cached_pages

    shutil.rmtree(path, ignore_errors=True)
    store = StateStore(path, io_mode=io_mode, io_concurrency=io_concurrency, max_writes_in_flight=DISK_WRITES_IN_FLIGHT)
    names = [f"unit{i}" for i in range(k)]
    cpu0 = os.times()  # the process's CPU (TensorStore's threads and the kernel's copies): cores Adam then lacks
    try:
        t0 = time.perf_counter()
        for f in [store.write(u, state) for u in names]:  # write() waits for a slot: the store's own bound
            f.result()
        write_s = time.perf_counter() - t0
        drop_cached_pages(path)  # a buffered read must come from the disk, not from the pages just written
        t0 = time.perf_counter()
        for i, u in enumerate(names):
            got = store.read(u).result()
            if i == 0 and not np.array_equal(got, state):
                raise AssertionError(f"{u} read back differs from what was written")
            del got
        read_s = time.perf_counter() - t0
        drop_cached_pages(path)
        t0 = time.perf_counter()
        reads = {i: store.read(names[i]) for i in range(min(DISK_READ_WINDOW, k))}
        writes = []
        for i, u in enumerate(names):
            got = reads.pop(i).result()
            if i + DISK_READ_WINDOW < k:  # the next read is issued as this unit's state goes back
                reads[i + DISK_READ_WINDOW] = store.read(names[i + DISK_READ_WINDOW])
            writes.append(store.write(u, got))
            del got
        for f in writes:
            f.result()
        mixed_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(path, ignore_errors=True)
    cpu1 = os.times()
    gb = k * state.nbytes / 1e9  # the CPU figures are per GB moved: 4k units in all
    return {"store_write_gbps": gb / write_s, "store_read_gbps": gb / read_s, "store_mixed_gbps": 2 * gb / mixed_s,
            "store_cpu_s_per_gb": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (4 * gb),
            "store_sys_s_per_gb": (cpu1.system - cpu0.system) / (4 * gb)}


def _describe_disk(path: Path) -> str:
    """The filesystem holding `path`, as /proc/mounts names it: 'DEVICE (FSTYPE at MOUNTPOINT)'."""
    real, best = os.path.realpath(path), ("unknown", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    return f"{best[0]} ({best[2]} at {best[1]})"


def _table(raw: dict, rows: list[dict]) -> str:
    lines = [f"{'variant':<14} {'write GB/s':>10} {'read GB/s':>10} {'mixed GB/s':>10} {'of raw mixed':>12} "
             f"{'CPU s/GB':>8}"]
    if raw:
        lines.append(f"{'raw (O_DIRECT)':<14} {raw['disk_raw_write_gbps']:>10.2f} {raw['disk_raw_read_gbps']:>10.2f} "
                     f"{raw['disk_raw_mixed_gbps']:>10.2f} {'':>12}")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['variant']:<14} {r['status']}: {r['error'][:80]}")
            continue
        frac = f"{r['disk_fraction_of_raw']:.0%}" if "disk_fraction_of_raw" in r else "-"
        lines.append(f"{r['variant']:<14} {r['store_write_gbps']:>10.2f} {r['store_read_gbps']:>10.2f} "
                     f"{r['store_mixed_gbps']:>10.2f} {frac:>12} {r['store_cpu_s_per_gb']:>8.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
