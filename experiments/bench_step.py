"""Question: how fast does one training step run, for the offloaded engine (a plan) or the all-in-HBM
reference, on a given model shape and batch, and how close is it to the block-only peak of the same blocks?

One process per configuration (the GPU memory cap must be set before jax starts). Appends one row in the
schema of shared/RESULTS.md to --out and, with --timeline, writes the last step's trace, PNG and summary (the
baselines: one more step, untimed, traced by jax.profiler).

  python experiments/bench_step.py --system lohan_jax --model paper-6b --batch 8 --gpu-budget-gib 24
  python experiments/bench_step.py --system reference --model gpt3-1.3b --batch 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _gpu_total_gib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return float(out.split()[0]) / 1024
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", choices=["lohan_jax", "reference", "jax_native_offload"], default="lohan_jax")
    p.add_argument("--model", default="paper-6b")
    p.add_argument("--layers", type=int, default=0, help="override the number of blocks (0: the model's)")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--gpu-budget-gib", type=float, default=0.0, help="cap GPU memory (0: the whole card)")
    p.add_argument("--weights", default="host")
    p.add_argument("--optim-state", default="host")
    p.add_argument("--activations", default="recompute")
    p.add_argument("--remat", action="store_true", help="reference: recompute each block in the backward "
                   "(jax.checkpoint, lohan_jax's recompute policy): what lets a resident 6B step fit 141 GB")
    p.add_argument("--gpu-state-blocks", type=int, default=0,
                   help="hand plan: the last N blocks keep weights and Adam state in HBM, updated on the GPU")
    p.add_argument("--disk-state-blocks", type=str, default="",
                   help="hand plan: blocks A:B (python range) keep their Adam state on disk (needs --disk-path)")
    p.add_argument("--disk-path", default="")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="AdamW learning rate (constant); a large model's first steps on random tokens overshoot at 1e-4")
    p.add_argument("--pinned-limit-gb", type=float, default=0.0,
                   help="cap XLA's pinned host pool (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB) at this many GiB (XLA reads it so); the "
                        "studies pass the plan's pinned need plus a margin (0: the environment's, else that of this run's plan "
                        "for lohan_jax, 120 for the others)")
    p.add_argument("--disk-io-order", choices=["reordered", "naive"], default=None,
                   help="disk state reads issued ahead of the updates (reordered) or only as each update starts, "
                        "behind the previous write (naive: the paper's naive order); default: the plan's")
    p.add_argument("--measure-disk-gib", type=float, default=0.0,
                   help="measure the disk's raw direct-I/O write, read and mixed rate on this many GiB, same run")
    p.add_argument("--disk-io-mode", choices=["default", "direct"], default="default",
                   help="the state store's file I/O (offload.disk_io_mode)")
    p.add_argument("--disk-io-concurrency", type=int, default=8, help="offload.disk_io_concurrency")
    p.add_argument("--swap-input-blocks", type=int, default=-1,
                   help="hand plan: swap the inputs of only the first N blocks to host (-1: as --activations says)")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--keep-turn", type=int, default=1)
    p.add_argument("--plan-file", default="", help="run this saved plan (Plan.save JSON) instead of a hand plan")
    p.add_argument("--model-profile", default="", help="a profile `lohan-jax profile` measured for this model: the "
                   "pinned cap of a hand plan is sized from its kept-activation bytes (since 2026-11-26 they equal the "
                   "analytic ones on the H100: experiments/attention_probe.py)")
    p.add_argument("--clip-norm", type=float, default=0.0,
                   help="clip_by_global_norm threshold (> 0 defers every update to after the backward)")
    p.add_argument("--sync-updates", action="store_true",
                   help="wait for every host update after each step: optimizer strictly after the backward")
    p.add_argument("--host-threads", type=int, default=0)
    p.add_argument("--experiment", default="step_throughput")
    p.add_argument("--out", default="experiments/results/step_throughput.jsonl")
    p.add_argument("--timeline", default="", help="directory for the last step's timeline (trace, PNG, summary); "
                   "reference and jax_native_offload: one more step after the timed ones, traced by jax.profiler")
    p.add_argument("--no-peak", action="store_true", help="skip the block-only peak measurement")
    p.add_argument("--allocator", default="", choices=("", "bfc", "vmm", "cuda_async"),
                   help="XLA's GPU allocator (XLA_PYTHON_CLIENT_ALLOCATOR; empty: the environment's, else XLA's BFC)")
    p.add_argument("--mem-trace", default="", help="JSON lines of host memory every 2 s, by phase (survives OOM kills)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    total = _gpu_total_gib()
    if args.gpu_budget_gib and total:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(args.gpu_budget_gib / total, 0.99):.4f}"
    else:  # the whole card (XLA's default pool is 75% of it)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    if args.pinned_limit_gb:  # before jax starts its GPU client: XLA's pinned pool grows by doubling regions up
        # to this cap and never shrinks, so a cap far above the plan's need lets it take up to twice the need
        os.environ["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = f"{args.pinned_limit_gb:g}"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.system == "lohan_jax" and "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB" not in os.environ:
        os.environ["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = f"{plan_pinned_cap_gib(args):g}"  # from the plan
    os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "120")
    if args.allocator:
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = args.allocator
    from lohan_jax.metrics import append_result

    row = {"experiment": args.experiment, "system": args.system, "model": args.model, "seq_len": args.seq,
           "batch_tokens": args.batch * args.seq, "gpu_budget_gib": args.gpu_budget_gib or total, "n_gpus": 1,
           "steps": args.steps, "micro_batches": args.micro, "lr": args.lr,
           "command": " ".join(["python", *sys.argv]),
           "pinned_limit_gib": float(os.environ["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"])}
    if args.system == "reference":
        row["remat"] = args.remat
    from lohan_jax.memtrace import MemTrace
    trace = MemTrace(args.mem_trace) if args.mem_trace else None
    try:
        if trace is not None:
            with trace:
                row.update(run(args, trace))
        else:
            row.update(run(args))
        row["status"] = "ok"
    except Exception as e:  # failures are results too (OOM above all)
        from lohan_jax.baselines.jax_native_offload import BaselineOutOfMemory
        from lohan_jax.engine.memory import MemoryBudgetError
        from lohan_jax.planner.auto import PlanRefused

        msg = f"{type(e).__name__}: {e}"
        refused = isinstance(e, (MemoryBudgetError, PlanRefused, BaselineOutOfMemory))  # nothing allocated
        row.update(status="oom" if refused or "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
                   else "failed", error=msg[:2000])
        import traceback
        traceback.print_exc()
    import jax
    device = jax.devices()[0]
    row["device"] = device.device_kind
    row["allocator"] = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default")
    stats = device.memory_stats() or {}  # None on the CPU backend
    for key, name in (("bytes_limit", "hbm_limit_gib"), ("peak_bytes_in_use", "hbm_peak_gib"),
                      ("largest_free_block_bytes", "hbm_largest_free_block_gib")):
        if key in stats:
            row[name] = stats[key] / 2**30
    append_result(args.out, row)
    print(json.dumps(row, indent=1, default=str))
    return 0 if row["status"] == "ok" else 1


def reference_fits_or_raise(n_params: int) -> None:
    """The resident reference holds fp32 params, gradients and both Adam moments on the device (16 B/param)
    before any activation: refuse at once (an OOM row), where the device's pool is smaller."""
    import jax

    from lohan_jax.baselines.jax_native_offload import BaselineOutOfMemory

    stats = jax.devices()[0].memory_stats() or {}
    need, limit = 16 * n_params / 2**30, stats.get("bytes_limit", 0) / 2**30
    if limit and need > limit:
        raise BaselineOutOfMemory(f"out of memory (refused before allocating): the all-in-HBM reference needs "
                                  f"{need:.1f} GiB for fp32 params, gradients and Adam moments alone; this device's "
                                  f"pool is {limit:.1f} GiB. Run it on a larger card (nvidia-h200) or a smaller model.")


def run(args, trace=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lohan_jax.batches import step_batch
    from lohan_jax.config import OptimConfig
    from lohan_jax.data import open_dataset
    from lohan_jax.metrics import model_flops_per_token, paper_flops_per_token
    from lohan_jax.models import build_model, get_spec

    spec = get_spec(args.model, **({"n_layers": args.layers} if args.layers else {}))
    model = build_model(spec, jnp.bfloat16)
    optim = OptimConfig(lr=args.lr, warmup_steps=0, clip_norm=args.clip_norm)
    b = args.batch // args.micro
    data = open_dataset("synthetic", seq_len=args.seq, batch_size=b, seed=0, vocab_size=spec.vocab_size)
    batches = [step_batch(data, s, args.micro) for s in range(args.steps)]
    tokens = args.batch * args.seq
    out: dict = {"params": spec.param_count()}

    if args.measure_disk_gib and args.disk_path:
        os.makedirs(args.disk_path, exist_ok=True)
        from lohan_jax.tiers.disk_probe import measure_raw_disk
        out.update(measure_raw_disk(args.disk_path, args.measure_disk_gib))
        print("raw disk:", out, flush=True)
    if args.system == "reference":
        from lohan_jax.reference import ReferenceTrainer
        reference_fits_or_raise(spec.param_count())
        params = jax.jit(lambda k: model.init(k, args.seq))(jax.random.key(0))
        trainer = ReferenceTrainer(model, params, optim, args.steps, jnp.bfloat16, remat=args.remat)
        del params
        engine = None
    elif args.system == "jax_native_offload":  # lohan_jax/baselines: one jitted step, state in pinned host memory
        from lohan_jax.baselines import make_trainer
        trainer, engine = make_trainer(args.system, model, optim, args.steps, batch_shape=(args.micro, b, args.seq)), None
    else:
        if trace is not None:
            trace.phase = "engine init"
        trainer = engine = make_engine(args, model, spec, optim, b, trace)
        print("memory plan:\n" + engine.memory.describe(), flush=True)
        out["plan"] = engine.plan.to_json()
    times, losses = [], []
    for s, batch in enumerate(batches):
        if trace is not None:
            trace.phase = f"step {s}"
        traced = args.timeline and s == len(batches) - 1 and engine is not None
        if traced:
            engine.timeline.clear()
            engine.timeline.enabled = True
        metrics = trainer.step(batch)
        if engine is not None and (args.sync_updates or s == 0):  # the warm-up's updates land before the clock
            engine.worker.drain()
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter())
        if s == 0 and engine is not None and engine.store is not None:  # disk bytes from here to the drain
            disk0 = engine.store.counters.bytes_read + engine.store.counters.bytes_written
        print(f"step {s}: loss {losses[-1]:.4f} at {times[-1] - times[0]:.3f}s", flush=True)
    if engine is not None:
        engine.worker.drain()
        if engine.store is not None:
            for u in engine.units:  # the last writes land too: the disk rate covers all traffic since step 0
                if u.write is not None:
                    u.write.result()
    t_drained = time.perf_counter()
    # Steps 1.. from the warm-up's drained end to the last step's drained end: every timed step's whole work, its
    # host updates included. (The median of dispatch-to-dispatch intervals over so few steps is not: the last
    # step's updates run after its dispatch returns, and until 2026-11-26 it was this figure, 25-30% short of the
    # host optimizer's own time per step in host-bound runs: 1.07 s measured with 1.39 s of AdamW per step.)
    step_s = (t_drained - times[0]) / (len(times) - 1) if len(times) > 2 else float("nan")
    out["step_s_dispatch_median"] = float(np.median(np.diff(times))) if len(times) > 2 else float("nan")
    out["step_s_method"] = "drained_mean"
    f6 = model_flops_per_token(spec.nonembed_param_count(), spec.n_layers, spec.d_model, args.seq, spec.vocab_size)
    fp = paper_flops_per_token(spec.n_layers, spec.d_model, args.seq)
    out.update(step_s=step_s, tokens_per_s=tokens / step_s, tflops_6n=tokens * f6 / step_s / 1e12,
               tflops_paper=tokens * fp / step_s / 1e12, losses=losses, host_rss_peak_gib=_peak_rss_gib())
    if hasattr(trainer, "report"):  # baselines: placement, compile time, XLA's memory analysis
        out.update(trainer.report())
    if args.timeline and engine is None:  # a trace that fails is noted in the row; the measurement stands
        try:
            out.update(_xla_timeline_report(trainer, step_batch(data, args.steps, args.micro), Path(args.timeline),
                                            args))
        except Exception as e:
            out["timeline_error"] = f"{type(e).__name__}: {e}"[:500]
    if engine is not None:
        out.update({f"traffic_{k}_per_step": v for k, v in engine.traffic.items()})
        m = engine.memory
        out.update(placement_hbm_gib=m.hbm_bytes / 2**30, placement_pinned_gib=m.pinned_bytes / 2**30,
                   placement_host_gib=m.ram_bytes / 2**30)
        if engine.store is not None:
            c = engine.store.counters
            n = max(len(times) - 1, 1)
            moved = c.bytes_read + c.bytes_written - disk0
            out.update(disk_bytes=engine.store.nbytes_on_disk(), disk_read_gb_total=c.bytes_read / 1e9,
                       disk_write_gb_total=c.bytes_written / 1e9, disk_gb_after_step0=moved / 1e9,
                       disk_s_after_step0=t_drained - times[0], disk_read_ahead_peak=engine._disk_reads.peak_live,
                       disk_io_order=engine.plan.disk_io_order.value, disk_reads_ahead=engine._disk_reads.reads_ahead,
                       disk_reads_at_update=engine._disk_reads.reads_at_update,
                       disk_gbps_achieved=moved / 1e9 / (t_drained - times[0]) if n else None)
            if out.get("disk_raw_mixed_gbps") and out["disk_gbps_achieved"]:
                # the step reads and writes about equally, concurrently: its raw rate is the mixed probe's; the
                # simplex figure (2/(1/read+1/write): one direction at a time) is kept beside it
                simplex = 2 / (1 / out["disk_raw_read_gbps"] + 1 / out["disk_raw_write_gbps"])
                out.update(disk_fraction_of_raw=out["disk_gbps_achieved"] / out["disk_raw_mixed_gbps"],
                           disk_raw_simplex_gbps=simplex, disk_fraction_of_simplex=out["disk_gbps_achieved"] / simplex)
        out["host_optim_busy_s_total"] = engine.worker.busy_s
        if args.timeline:
            out.update(_timeline_report(engine, Path(args.timeline), args))
        if not args.no_peak:
            out.update(_block_peak(engine, spec, b, args, tokens, out["tokens_per_s"]))
        engine.close()
    return out


def build_plan(args, spec):
    """The plan the flags describe (a saved plan, or a uniform one with the hand-plan flags applied); no jax."""
    import dataclasses

    from lohan_jax.plan import Plan, Tier, UpdateOn, uniform_plan

    plan = Plan.load(args.plan_file) if args.plan_file else uniform_plan(
        spec.n_layers, weights=args.weights, optim_state=args.optim_state, activations=args.activations,
        prefetch_depth=args.prefetch, keep_turn_blocks=args.keep_turn)
    if args.gpu_state_blocks:
        gpu = dataclasses.replace(plan.blocks[0], weights=Tier.HBM, optim_state=Tier.HBM, update_on=UpdateOn.GPU)
        n = spec.n_layers - args.gpu_state_blocks
        plan = dataclasses.replace(plan, blocks=plan.blocks[:n] + (gpu,) * args.gpu_state_blocks)
    if args.disk_state_blocks:
        lo, hi = (int(v) for v in args.disk_state_blocks.split(":"))
        disk = dataclasses.replace(plan.blocks[0], weights=Tier.HOST, optim_state=Tier.DISK, update_on=UpdateOn.CPU)
        plan = dataclasses.replace(plan, blocks=tuple(disk if lo <= i < hi else u for i, u in enumerate(plan.blocks)))
    if args.disk_io_order:
        plan = dataclasses.replace(plan, disk_io_order=args.disk_io_order)
    if args.swap_input_blocks >= 0:  # the first blocks' inputs are needed last: swap those, keep the rest
        swapped = [dataclasses.replace(u, activations=dataclasses.replace(u.activations, swap_input=i < args.swap_input_blocks))
                   for i, u in enumerate(plan.blocks)]
        plan = dataclasses.replace(plan, blocks=tuple(swapped))
    return plan


def plan_pinned_cap_gib(args) -> float:
    """XLA's pinned-pool cap for the plan's pinned need (+ the margin), as `lohan-jax train` sets it: a cap far
    above the need lets the pool grow to ~2x it (plan_memory.pinned_pool_limit_gib), which the RAM check counts."""
    from lohan_jax.config import load_config
    from lohan_jax.models import get_spec
    from lohan_jax.plan_memory import pinned_pool_limit_gib
    from lohan_jax.planner.capacity import memory
    from lohan_jax.planner.cli import workload_for

    cfg = load_config(None, [f"model.name={args.model}", f"train.seq_len={args.seq}", f"train.batch_size={args.batch}",
                             f"train.micro_batches={args.micro}", f"optim.clip_norm={args.clip_norm}"])
    mp = None
    if args.model_profile:
        from lohan_jax.planner.profile import load_profile
        _, mp = load_profile(args.model_profile)
    return pinned_pool_limit_gib(memory(build_plan(args, get_spec(args.model)), workload_for(cfg, mp)).pinned_bytes)


def make_engine(args, model, spec, optim, b, trace=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lohan_jax.engine import OffloadEngine
    from lohan_jax.optim import host_adamw
    from lohan_jax.timeline import Timeline

    plan = build_plan(args, spec)
    if args.host_threads:
        host_adamw.set_num_threads(args.host_threads)
    host_adamw.warmup()
    key = jax.random.key(0)
    init_block = jax.jit(lambda k, i: model.block_module.init(jax.random.fold_in(k, i),
                                                              jnp.zeros((1, 8, spec.d_model), jnp.bfloat16))["params"])
    k_blocks = jax.random.split(key, 3)[2]

    def unit_params(k):  # initialised on the GPU, read as numpy straight into pageable memory: not through
        # XLA's pinned pool, which the run caps at the plan's need (1.3 GB of fp32 per 13B block would crowd it)
        if trace is not None:  # where a slow init spends its time shows in the memory trace
            trace.phase = f"engine init: unit {k}"
        if 1 <= k <= spec.n_layers:
            with jax.numpy_dtype_promotion("standard"):
                tree = init_block(k_blocks, k - 1)
        else:
            tree = model.init_unit(key, k, 8)
        return jax.device_get(tree)

    t0 = time.perf_counter()
    engine = OffloadEngine(model, unit_params, plan, optim=optim, total_steps=args.steps,
                           micro_batch_shape=(b, args.seq), n_micro=args.micro, compute_dtype=jnp.bfloat16,
                           timeline=Timeline(enabled=False), disk_path=args.disk_path or None,
                           disk_io_mode=args.disk_io_mode, disk_io_concurrency=args.disk_io_concurrency)
    print(f"engine ready in {time.perf_counter() - t0:.1f}s; plan:\n{plan.table()}", flush=True)
    return engine


def _timeline_report(engine, out_dir: Path, args) -> dict:
    engine.watcher.flush()
    engine.timeline.enabled = False
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}-b{args.batch}-{args.gpu_budget_gib:g}gib"
    engine.timeline.to_chrome_trace(out_dir / f"{stem}.trace.json")
    engine.timeline.plot(out_dir / f"{stem}.png", title=f"lohan_jax {args.model} batch {args.batch}x{args.seq}")
    s = engine.timeline.summary()
    lanes, total = s["lanes"], s["total_s"]
    busy = lambda lane: lanes.get(lane, {}).get("busy_s", 0.0)
    cpu = busy("cpu_optim")
    hidden = s["overlap_s"].get("cpu_optim", {}).get("gpu", 0.0)
    t = engine.traffic
    return {"timeline_step_s": total, "gpu_busy_fraction": busy("gpu") / total if total else None,
            "h2d_gbps": t["h2d_bytes"] / busy("h2d") / 1e9 if busy("h2d") else None,
            "d2h_gbps": t["d2h_bytes"] / busy("d2h") / 1e9 if busy("d2h") else None,
            "cpu_optim_s": cpu, "cpu_optim_hidden_fraction": hidden / cpu if cpu else None,
            "timeline_png": str(out_dir / f"{stem}.png")}


def _xla_timeline_report(trainer, batch, out_dir: Path, args) -> dict:
    """One more step, after the timed ones (their times stay clean), under jax.profiler: its GPU streams (on the
    CPU backend, XLA's ops on host threads: lane host_compute) in lohan_jax's lanes, PNG, trace and figures."""
    import tempfile

    import jax

    from lohan_jax.timeline import STEP_MARKER, timeline_from_trace, write_step_timeline

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames: not a lane, and the bulk of a trace's events
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=options):
            with jax.profiler.TraceAnnotation(STEP_MARKER):
                trainer.step(batch)
                jax.block_until_ready((trainer.params, trainer.opt_state))
        timeline = timeline_from_trace(next(Path(tmp).glob("plugins/profile/*/perfetto_trace.json.gz")),
                                       window=STEP_MARKER)
    if jax.devices()[0].platform == "gpu" and "gpu" not in timeline.lanes():
        raise RuntimeError("jax.profiler recorded no GPU kernel in the step (CUPTI unavailable?)")
    stem = f"{args.system}-{args.model}-b{args.batch}-{args.gpu_budget_gib:g}gib"  # beside lohan_jax's, same config
    return write_step_timeline(timeline, out_dir, stem, f"{args.system} {args.model} batch {args.batch}x{args.seq}: "
                                                        "one step (jax.profiler)")


def _block_peak(engine, spec, b, args, tokens, achieved) -> dict:
    """Same blocks' forward+backward (same activation policy) and head, all resident, no transfers."""
    import jax
    import jax.numpy as jnp

    prog, u = engine.block_programs[0], engine.block_us[0]
    w = engine._weights(u)
    x = jax.random.normal(jax.random.key(1), (b, args.seq, spec.d_model), jnp.bfloat16)
    w_head = engine._weights(engine.head_u)
    w_tied = engine._weights(engine.embed_u) if engine.edges.tied else engine._no_tied
    tok = jnp.zeros((b, args.seq), jnp.int32)
    wts = jnp.full((b, args.seq), 1.0 / tokens, jnp.float32)

    def block_once():
        y, r = prog.fwd(w, x)
        return prog.bwd(w, x + 0, r, jnp.ones_like(y))[2]

    def head_once():
        return engine.edges.head_fwd_bwd(w_head, w_tied, x + 0, tok, wts)[4]

    def timed(fn, n=6):
        fn().block_until_ready()
        t0 = time.perf_counter()
        for _ in range(n):
            r = fn()
        r.block_until_ready()
        return (time.perf_counter() - t0) / n

    t_block, t_head = timed(block_once), timed(head_once, 3)
    per_micro = spec.n_layers * t_block + t_head
    peak = b * args.seq / per_micro
    return {"block_ms": t_block * 1e3, "head_ms": t_head * 1e3, "block_peak_tokens_per_s": peak,
            "fraction_of_block_peak": achieved / peak}


def _peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    sys.exit(main())
