"""How many parameters per second does each host AdamW implementation update on this machine?

Compares, on one flat buffer of --params parameters (bf16 grads in, fp32 master/mu/nu, bf16 weights out):
  host_adam_numpy      naive vectorised numpy with temporaries (numpy is single-threaded: threads=1)
  host_adam_optax_cpu  optax.adamw jitted on jax's CPU backend, donated buffers (XLA's own pool: all cores)
  host_adam_numba      lohan_jax.optim.host_adamw.adamw_update_ at 1, half, all-1 and all threads
Median step time over --reps after a warm-up step. One JSON row per (system, threads) is appended to
experiments/results/host_adam.jsonl; a short table is printed last. AdamW moves 28 bytes per parameter
(read g 2, master/mu/nu 12; write master/mu/nu 12, out 2), so params_per_s * 28 is the memory bandwidth used.

    python experiments/host_adam_bench.py            # 256M params (the GPU machine)
    python experiments/host_adam_bench.py --quick    # 32M params, 3 reps
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # we only use jax's CPU backend here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lohan_jax.metrics import append_result  # noqa: E402
from lohan_jax.optim import host_adamw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HP = dict(b1=0.9, b2=0.999, eps=1e-8)
LR, WD = 1e-4, 0.1


def device_description() -> str:
    """CPU model and core count from /proc/cpuinfo, plus the GPU name when nvidia-smi answers."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{model} x{os.cpu_count()} cores"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True)
            desc += " + " + ", ".join(sorted(set(out.stdout.split("\n")) - {""}))
        except (OSError, subprocess.SubprocessError):
            pass
    return desc


def head_sha() -> str:
    """HEAD's commit read from .git's files (no git process), or "unknown"."""
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (REPO / ".git" / ref).exists():
            return (REPO / ".git" / ref).read_text().strip()
        for line in (REPO / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def median_step_s(step, reps: int) -> float:
    """Median wall time of step() after one untimed warm-up call (which compiles)."""
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_buffers(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    master = rng.standard_normal(n, dtype=np.float32)
    grad = (rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)).astype(ml_dtypes.bfloat16)
    return master, np.zeros(n, np.float32), np.zeros(n, np.float32), grad, np.empty(n, ml_dtypes.bfloat16)


def bench_numba(n: int, threads: int, reps: int) -> float:
    master, mu, nu, grad, out = make_buffers(n)
    bounds, decays = host_adamw.make_segments([n - n // 100, n // 100], [WD, 0.0])  # a masked tail
    host_adamw.set_num_threads(threads)
    count = [0]

    def step():
        count[0] += 1
        host_adamw.adamw_update_(master, mu, nu, grad, out, lr=LR, count=count[0], seg_bounds=bounds,
                                 seg_decay=decays, **HP)
    return median_step_s(step, reps)


def bench_numpy(n: int, reps: int) -> float:
    master, mu, nu, grad, out = make_buffers(n)
    b1, b2, eps = HP["b1"], HP["b2"], np.float32(HP["eps"])
    count = [0]

    def step():
        count[0] += 1
        g = grad.astype(np.float32)
        mu[:] = np.float32(b1) * mu + np.float32(1 - b1) * g
        nu[:] = np.float32(b2) * nu + np.float32(1 - b2) * (g * g)
        u = (mu / np.float32(1 - b1 ** count[0])) / (np.sqrt(nu / np.float32(1 - b2 ** count[0])) + eps)
        master[:] = master - np.float32(LR) * (u + np.float32(WD) * master)
        out[:] = master.astype(ml_dtypes.bfloat16)
    return median_step_s(step, reps)


def bench_optax(n: int, reps: int) -> float:
    cpu = jax.devices("cpu")[0]
    master, _, _, grad, _ = make_buffers(n)
    opt = optax.adamw(LR, weight_decay=WD, **HP)
    params = jax.device_put(master, cpu)
    state = jax.device_put(opt.init(params), cpu)
    grad = jax.device_put(grad, cpu)
    out = jax.device_put(np.zeros(n, ml_dtypes.bfloat16), cpu)

    def update(params, state, grad, out):
        del out  # donated so XLA can write the new bf16 copy into its buffer
        u, state = opt.update(grad.astype(jnp.float32), state, params)
        params = optax.apply_updates(params, u)
        return params, state, params.astype(jnp.bfloat16)

    update = jax.jit(update, donate_argnums=(0, 1, 3))
    bufs = [params, state, out]

    def step():
        bufs[0], bufs[1], bufs[2] = update(bufs[0], bufs[1], grad, bufs[2])
        jax.block_until_ready(bufs)
    return median_step_s(step, reps)


def thread_counts() -> list[int]:
    top = numba.config.NUMBA_NUM_THREADS
    return sorted({1, max(1, top // 2), max(1, top - 1), top})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=None, help="parameters (default 256e6, 32e6 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per system (default 7, 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small and fast: a smoke run")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "host_adam.jsonl"))
    args = ap.parse_args(argv)
    n = int(args.params or (32e6 if args.quick else 256e6))
    reps = args.reps or (3 if args.quick else 7)
    host_adamw.warmup()
    runs = [("host_adam_numpy", 1, lambda: bench_numpy(n, reps)),
            ("host_adam_optax_cpu", os.cpu_count(), lambda: bench_optax(n, reps))]
    runs += [("host_adam_numba", t, lambda t=t: bench_numba(n, t, reps)) for t in thread_counts()]
    stamp = dict(experiment="host_adam", params=n, device=device_description(), git_sha=head_sha(),
                 jax_version=jax.__version__, command=" ".join(sys.argv), status="ok")
    rows = []
    for system, threads, bench in runs:
        step_s = bench()
        rows.append(append_result(args.out, dict(stamp, system=system, threads=threads,
                                                 params_per_s=n / step_s, step_s=step_s)))
    print(f"\n{stamp['device']}, {n / 1e6:.0f}M params, median of {reps}")
    print(f"{'system':<22}{'threads':>8}{'step_s':>10}{'Gparams/s':>11}{'GB/s@28B':>10}")
    for r in rows:
        print(f"{r['system']:<22}{r['threads']:>8}{r['step_s']:>10.4f}{r['params_per_s'] / 1e9:>11.3f}"
              f"{r['params_per_s'] * 28 / 1e9:>10.1f}")


if __name__ == "__main__":
    main()
