"""`lohan-jax plan` (no GPU needed) and `lohan-jax profile` (measures this machine and the config's model)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

DEFAULT_MACHINE = "h100-80g"


def add_plan_commands(subparsers) -> None:
    """Register `plan` and `profile` on the `lohan-jax` argument parser's subparsers."""
    plan = subparsers.add_parser("plan", help="plan placement and activations for a config on a machine; "
                                              "predict the step (no GPU needed)")
    plan.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    plan.add_argument("--machine", help=f"a built-in machine ({', '.join(_builtin())}) or a machine YAML/JSON file; "
                                        f"default: the --profile's machine, else {DEFAULT_MACHINE}")
    plan.add_argument("--profile", help="a profile saved by `lohan-jax profile` (its measured model times are used "
                                        "when they match the config's model and sequence length)")
    plan.add_argument("--disk", choices=["auto", "on", "off"], default="auto",
                      help="the disk tier (modelled, not yet executed by the engine): auto = only if nothing fits "
                           "without it")
    plan.add_argument("--paper-placement", action="store_true",
                      help="every block's optimizer state on disk, as the paper's system keeps it")
    plan.add_argument("--out", help="save the plan as JSON here (train with --set offload.plan_file=PATH)")
    plan.add_argument("--json", action="store_true", help="print the prediction as JSON")
    plan.set_defaults(func=_plan)

    prof = subparsers.add_parser("profile", help="measure this machine and the config's model; save as JSON")
    prof.add_argument("config", nargs="?", help="YAML config file (its model, micro-batch and sequence length)")
    prof.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    prof.add_argument("--out", default="profile.json", help="where to save the profile (.json or .yaml)")
    prof.add_argument("--name", default="", help="the machine's name in the profile")
    prof.add_argument("--disk-path", default="", help="measure the disk tier here (writes a temporary file)")
    prof.add_argument("--quick", action="store_true", help="small transfers and few repetitions")
    prof.add_argument("--no-model", action="store_true", help="measure the machine only")
    prof.set_defaults(func=_profile)


def _builtin() -> list[str]:
    from lohan_jax.planner.machines import BUILTIN
    return list(BUILTIN)


def workload_for(cfg, model_profile=None):
    """The planner's workload for a run config (bf16 compute unless the config says float32)."""
    from lohan_jax.planner.profile import model_profile_from_spec
    from lohan_jax.planner.workload import Workload

    t = cfg.train
    itemsize = 4 if t.compute_dtype == "float32" else 2
    mp = model_profile
    if mp is None or mp.model != cfg.model.name or mp.seq_len != t.seq_len or mp.n_layers != cfg.model.n_layers \
            or mp.itemsize != itemsize:
        mp = model_profile_from_spec(cfg.model, t.seq_len, itemsize)
    return Workload(mp, t.batch_size, t.micro_batches, clip=cfg.optim.clip_norm > 0)


def _plan(args: argparse.Namespace) -> int:
    from lohan_jax.config import load_config
    from lohan_jax.planner.auto import with_run_caps
    from lohan_jax.planner.explain import bottleneck, format_result
    from lohan_jax.planner.machines import machine
    from lohan_jax.planner.profile import load_profile
    from lohan_jax.planner.search import SearchOptions, search, suggestions

    cfg = load_config(args.config, args.set)
    prof_machine = prof_model = None
    if args.profile:
        prof_machine, prof_model = load_profile(args.profile)
    m = machine(args.machine) if args.machine else prof_machine or machine(DEFAULT_MACHINE)
    m = with_run_caps(m, cfg.offload)  # the run's own caps on the engine's budgets apply to the plan as well
    wl = workload_for(cfg, prof_model)
    opts = SearchOptions(allow_disk={"auto": None, "on": True, "off": False}[args.disk],
                         force_state="disk" if args.paper_placement else None)
    result = search(wl, m, opts)
    if args.json:
        p = result.prediction
        print(json.dumps({"fits": result.plan is not None, "executable": result.executable,
                          "problems": list(result.problems),
                          "prediction": None if p is None else dataclasses.asdict(p)}, indent=1))
    else:
        print(format_result(result))
    if result.plan is None:
        print("smallest changes that would make it fit:")
        for s in suggestions(wl, m, opts) or ["none found (a larger GPU, or a smaller model)"]:
            print(f"  - {s}")
        return 1
    if not result.executable:
        fixes = suggestions(wl, m, opts, executable_only=True)
        if fixes:
            print("to run without the disk tier: " + "; or ".join(fixes))
    if args.out:
        resource, _ = bottleneck(result.plan, wl, m, result.prediction)
        plan = dataclasses.replace(result.plan, predicted_bottleneck=resource, notes=(
            f"planned by lohan-jax plan for {cfg.model.name}, batch {wl.batch_size} x {wl.model.seq_len} in "
            f"{wl.n_micro} micro-batch(es), on {m.name}", *result.plan.notes), disk_io_order=cfg.offload.disk_io_order)
        plan.save(args.out)
        sets = " ".join(f"--set {s}" for s in args.set)
        parts = ("lohan-jax train", args.config or "", sets, f"--set offload.plan_file={args.out}")
        cmd = " ".join(x for x in parts if x)
        how = f"train with: {cmd}" if plan.engine_executable else "NOT executable by this engine yet (weights on disk)"
        print(f"saved the plan to {args.out}; {how}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from lohan_jax.config import load_config
    from lohan_jax.planner.measure import measure_machine, measure_model_profile
    from lohan_jax.planner.profile import save_profile

    cfg = load_config(args.config, args.set)
    t = cfg.train
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}.get(t.compute_dtype,
                                                                     jnp.bfloat16 if on_gpu else jnp.float32)
    model = None
    if not args.no_model:
        attention = None if t.attention == "auto" else t.attention
        model = measure_model_profile(cfg.model, t.micro_batch_size, t.seq_len, dtype, attention,
                                      reps=2 if args.quick else 5, chunks=not args.quick,
                                      level_step=3 if args.quick else 1)  # --quick: every third saved-set level
    machine = measure_machine(args.name, args.disk_path, args.quick, model)
    save_profile(args.out, machine, model)
    print(f"machine {machine.name}: HBM {machine.hbm_gib:.1f} GiB free, block matmul {machine.gpu_block_tflops:.1f} "
          f"TFLOP/s, PCIe {machine.h2d_gbps:.1f}/{machine.d2h_gbps:.1f} GB/s ({machine.duplex_gbps:.1f} both), host "
          f"AdamW {machine.host_adam_gparams_per_s:.2f} G/s, RAM {machine.ram_gib:.1f} GiB"
          + (f", disk {machine.disk_gib:.0f} GiB at {machine.disk_read_gbps:.2f}/{machine.disk_write_gbps:.2f} GB/s"
             if machine.disk_gib else ""))
    if model is not None:
        print(f"model {model.model} at {t.micro_batch_size}x{t.seq_len}: block fwd {model.block_fwd_ms:.2f} ms, bwd "
              f"{model.block_bwd_keep_ms:.2f} ms (keep) / {model.block_bwd_recompute_ms:.2f} ms (recompute)"
              + (" [recompute share:ms " + " ".join(f"{x:.2f}:{ms:.2f}" for x, ms in model.block_bwd_points_ms) + "]"
                 if model.block_bwd_points_ms else "") + ", head "
              f"{model.head_ms:.2f} ms; activations per token: "
              + ", ".join(f"{c.name} {c.nbytes_per_token:.0f} B" for c in model.candidates)
              + (f"; per-token time at {model.size_points[-1][0] // t.seq_len}x{t.seq_len}: block "
                 f"{model.size_points[-1][1]:.2f}x, head {model.head_size_points[-1][1]:.2f}x" if model.size_points else ""))
    print(f"saved to {Path(args.out)}")
    return 0
