"""Question: how do tokens/s scale from one GPU to N GPUs of one host (DataParallelEngine: batch split, weights
gathered per use, gradients reduce-scattered, optimizer state sharded ZeRO-style over the GPUs and updated by
the shared host AdamW), for the paper's 13B shape at the same per-GPU batch? (issue 9: >= 1.8x on 2 GPUs,
>= 3.4x on 4; the paper: 278 and 514 TFLOPS on 2 and 4 RTX 4090s against 156 on one.)

Each GPU count runs in its own process (the host state of a 13B model takes most of the RAM); this driver
refuses when the host has fewer GPUs than asked, runs the counts, and appends one row per count in the
schema of shared/RESULTS.md to --out, with `scaling` = tokens/s over the one-GPU tokens/s, the interconnect
measured on those GPUs (all-gather / reduce-scatter bus bandwidth, all GPUs' PCIe at once) and the planner's
prediction from those measurements (lohan_jax.planner.parallel).

  python experiments/bench_data_parallel.py                       # paper-13b, 1 and every 2^k GPUs here
  python experiments/bench_data_parallel.py --gpus 1,2,4 --batch-per-gpu 8
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/bench_data_parallel.py \\
      --model gpt-tiny --seq 32 --batch-per-gpu 2 --steps 3 --out /tmp/dp.jsonl   # the plumbing, on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="paper-13b", help="a registry name (lohan-jax models)")
    p.add_argument("--layers", type=int, default=0, help="override the number of blocks (0: the model's)")
    p.add_argument("--gpus", default="auto", help="comma-separated GPU counts, e.g. 1,2,4 (auto: 1 and every "
                                                  "power of two up to the host's count)")
    p.add_argument("--batch-per-gpu", type=int, default=8, help="sequences per GPU per optimizer step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps (the median excludes the first)")
    p.add_argument("--weights", default="host")
    p.add_argument("--optim-state", default="host")
    p.add_argument("--activations", default="recompute")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype (auto: bfloat16 on GPUs, float32 on the CPU)")
    p.add_argument("--out", default=str(ROOT / "experiments/results/data_parallel.jsonl"))
    p.add_argument("--log-dir", default="/tmp/bench_data_parallel", help="each GPU count's full log goes here")
    p.add_argument("--only", type=int, default=0, help=argparse.SUPPRESS)  # a child: measure this count
    return p.parse_args(argv)


# ---- the driver (never starts jax itself: the children need all of the GPUs' memory) ---------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only:
        print("ROW " + json.dumps(measure(args)), flush=True)
        return 0
    available, kind = _probe()
    counts = _counts(args.gpus, available)
    if available < 2 or max(counts) > available:
        asked = "at least 2" if args.gpus == "auto" else str(max(counts))
        print(f"bench_data_parallel: refused: this host has {available} {kind} device(s) and the study needs "
              f"{asked}. Run it on a host with several GPUs (e.g. --gpus 1,2 on two, 1,2,4 on four), or on the "
              "CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N and a tiny --model.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from lohan_jax.metrics import append_result

    rows = []
    for n in counts:
        print(f"== {n} GPU(s)", flush=True)
        rows.append(_child(args, n))
        r = rows[-1]
        print(f"   {r['status']}: " + (f"{r['tokens_per_s']:,.0f} tokens/s, step {r['step_s']:.3f} s"
                                        if r["status"] == "ok" else r.get("error", "")[:400]), flush=True)
    base = next((r for r in rows if r["n_gpus"] == 1 and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["scaling"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("predicted_tokens_per_s") and base.get("predicted_tokens_per_s"):
                r["predicted_scaling"] = r["predicted_tokens_per_s"] / base["predicted_tokens_per_s"]
        append_result(args.out, r)
    print(f"\n{'GPUs':>4} {'tokens/s':>10} {'step s':>8} {'TFLOPS 6N':>10} {'scaling':>8} {'predicted':>9}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['n_gpus']:>4} {r['tokens_per_s']:>10,.0f} {r['step_s']:>8.3f} {r['tflops_6n']:>10.1f} "
                  f"{r.get('scaling', float('nan')):>8.2f} {r.get('predicted_scaling', float('nan')):>9.2f}")
        else:
            print(f"{r['n_gpus']:>4} {r['status']}")
    print(f"rows appended to {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _probe() -> tuple[int, str]:
    """The host's accelerator count, from a short-lived process (jax holds GPU memory until it exits)."""
    code = "import jax; d = jax.local_devices(); print(len(d), d[0].platform)"
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    n, platform = out.split()[-2:]
    return int(n), platform.upper()


def _counts(spec: str, available: int) -> list[int]:
    if spec == "auto":
        return [1] + [2**k for k in range(1, 8) if 2**k <= available]
    counts = sorted({int(c) for c in spec.split(",") if c.strip()})
    if not counts or counts[0] < 1:
        raise SystemExit(f"--gpus {spec!r}: expected counts >= 1, e.g. 1,2,4")
    return counts if counts[0] == 1 else [1, *counts]  # scaling is against one GPU, measured in the same run


def _child(args, n: int) -> dict:
    """Runs this script for one GPU count; its row (or why it failed)."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--only")]
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", str(n)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the whole card (XLA's default pool is 75%)
    env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", str(int(os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES") * 0.9 / 1e9)))  # XLA caps pinned memory at 64 GB otherwise (MACHINE.md)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = Path(args.log_dir) / f"{args.model}-{n}gpu.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    row = next((json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")), None)
    if row is None:
        tail = (proc.stderr or proc.stdout)[-2000:]
        status = "oom" if "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower() else "failed"
        row = {"experiment": "data_parallel", "system": "lohan_jax", "model": args.model, "n_gpus": n,
               "status": status, "error": f"exit {proc.returncode}: {tail}"}
    row["command"] = " ".join(["python", "experiments/bench_data_parallel.py", *argv])
    return row


# ---- one GPU count (a child process) -----------------------------------------------------------------------
def measure(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lohan_jax.batches import step_batch
    from lohan_jax.data import open_dataset
    from lohan_jax.metrics import model_flops_per_token, paper_flops_per_token
    from lohan_jax.models import build_model, get_spec

    n = args.only
    devices = jax.local_devices()[:n]
    on_cpu = devices[0].platform == "cpu"
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}.get(args.dtype, jnp.float32 if on_cpu else jnp.bfloat16)
    spec = get_spec(args.model, **({"n_layers": args.layers} if args.layers else {}))
    batch = args.batch_per_gpu * n
    row = {"experiment": "data_parallel", "system": "lohan_jax", "model": args.model, "params": spec.param_count(),
           "seq_len": args.seq, "batch_tokens": batch * args.seq, "per_gpu_batch": args.batch_per_gpu,
           "gpu_budget_gib": _card_gib(devices[0]), "n_gpus": n, "steps": args.steps,
           "activations": args.activations, "weights": args.weights, "optim_state": args.optim_state,
           "compute_dtype": jnp.dtype(dtype).name, "device": devices[0].device_kind, "cpu_cores": os.cpu_count()}
    row.update(_predict_inputs(args, spec, n, dtype, on_cpu))  # measured before the engine takes the memory
    model = build_model(spec, dtype)
    data = open_dataset("synthetic", seq_len=args.seq, batch_size=batch, seed=0, vocab_size=spec.vocab_size)
    batches = [step_batch(data, s, 1) for s in range(args.steps)]
    t0 = time.perf_counter()
    engine = _engine(args, model, spec, dtype, devices, batch)
    row["engine_init_s"] = time.perf_counter() - t0
    times, losses = [], []
    for s, b in enumerate(batches):
        metrics = engine.step(b)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter())
        print(f"step {s}: loss {losses[-1]:.4f} at {times[-1] - times[0]:.3f}s", flush=True)
    engine.worker.drain()
    step_s = float(np.median(np.diff(times))) if len(times) > 2 else float(times[-1] - times[0])
    tokens = batch * args.seq
    f6 = model_flops_per_token(spec.nonembed_param_count(), spec.n_layers, spec.d_model, args.seq, spec.vocab_size)
    fp = paper_flops_per_token(spec.n_layers, spec.d_model, args.seq)
    row.update(step_s=step_s, tokens_per_s=tokens / step_s, tflops_6n=tokens * f6 / step_s / 1e12,
               tflops_paper=tokens * fp / step_s / 1e12, losses=losses,
               host_optim_busy_s_total=engine.worker.busy_s, plan=engine.plan.to_json(),
               **{f"traffic_{k}_per_step": v for k, v in engine.traffic.items()})
    engine.close()
    row["status"] = "ok"
    return row


def _card_gib(device) -> float | None:
    stats = device.memory_stats() or {}
    return stats["bytes_limit"] / 2**30 if "bytes_limit" in stats else None


def _plan(args, n_layers: int):
    from lohan_jax.plan import uniform_plan
    return uniform_plan(n_layers, weights=args.weights, optim_state=args.optim_state, activations=args.activations)


def _engine(args, model, spec, dtype, devices, batch):
    """One GPU: OffloadEngine; several: DataParallelEngine; the same plan. Units are initialised one at a
    time on the first GPU and landed as numpy (a 13B model's fp32 copy never exists whole)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lohan_jax.config import OptimConfig
    from lohan_jax.engine import DataParallelEngine, OffloadEngine
    from lohan_jax.optim import host_adamw
    from lohan_jax.tiers import MemorySpaces

    host_adamw.warmup()
    key = jax.random.key(0)
    init_block = jax.jit(lambda k, i: model.block_module.init(jax.random.fold_in(k, i),
                                                              jnp.zeros((1, 8, spec.d_model), dtype))["params"])
    k_blocks = jax.random.split(key, 3)[2]

    spaces = MemorySpaces(devices[0])

    def unit_params(k):  # landed in pinned memory at PCIe speed, then read as numpy (not np.asarray's 1.2 GB/s)
        with jax.default_device(devices[0]), jax.numpy_dtype_promotion("standard"):
            tree = init_block(k_blocks, k - 1) if 1 <= k <= spec.n_layers else model.init_unit(key, k, 8)
        return jax.tree.map(np.asarray, spaces.to_host(tree))

    kw = dict(optim=OptimConfig(lr=1e-4, warmup_steps=0), total_steps=args.steps, micro_batch_shape=(batch, args.seq),
              compute_dtype=dtype)
    plan = _plan(args, spec.n_layers)
    if len(devices) == 1:
        return OffloadEngine(model, unit_params, plan, device=devices[0], **kw)
    return DataParallelEngine(model, unit_params, plan, devices=devices, **kw)


def _predict_inputs(args, spec, n: int, dtype, on_cpu: bool) -> dict:
    """The interconnect of these GPUs and the host AdamW rate, measured here, and the planner's prediction
    from them (the one-GPU box's described rates otherwise: lohan_jax.planner.machines.H100_80G)."""
    import jax.numpy as jnp

    from lohan_jax.planner import Workload, machine, model_profile_from_spec, predict
    from lohan_jax.planner import parallel as par
    from lohan_jax.planner.profile import available_ram_gib, measure_host_adam_gparams_per_s

    out: dict = {}
    adam = measure_host_adam_gparams_per_s((4 if on_cpu else 64) << 20)
    m = machine("h100-80g").with_(host_adam_gparams_per_s=adam, cpu_cores=os.cpu_count() or 0,
                                  ram_gib=available_ram_gib())
    out["host_adam_gparams_per_s"] = adam
    profile = model_profile_from_spec(spec, args.seq, jnp.dtype(dtype).itemsize)
    plan = _plan(args, spec.n_layers)
    batch = args.batch_per_gpu * n
    if n == 1:
        pred = predict(plan, Workload(profile, batch), m)
    else:
        ic = par.measure_interconnect(n, nbytes=(4 if on_cpu else 256) << 20)
        out.update(par.bandwidth_row(ic))
        p = par.predict_data_parallel(plan, Workload(profile, batch), m, ic)
        pred, out["predicted_collective_s"] = p, p.collective_s
    out.update(predicted_step_s=pred.step_s, predicted_tokens_per_s=pred.tokens_per_s,
               predicted_on=f"{m.name} with this host's AdamW rate and RAM" + (", measured interconnect" if n > 1
                                                                                  else ""))
    return out


if __name__ == "__main__":
    sys.exit(main())
