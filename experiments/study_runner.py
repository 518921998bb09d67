"""Shared by the study scripts (experiments/study_*.py): the runs of a study as child processes, the planner's
choices and predictions, a time budget that keeps a study inside one GPU-machine call, and the plots.

Every configuration is a child process (bench_step.py, baselines/deepspeed_gpt.py), so a CUDA OOM, a crash or
the host's OOM killer is a result row, never the end of the study. Children are the host OOM killer's first
choice (oom_score_adj 1000). A run whose estimate does not fit what is left of the budget
is recorded as skipped; a child still running when the budget ends is stopped and recorded as such.
The study process itself never touches the GPU (study_main sets JAX_PLATFORMS=cpu for it; children get the
caller's setting).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CALLER_JAX_PLATFORMS = os.environ.get("JAX_PLATFORMS")  # what the children get (study_main pins ours to cpu)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))
from study_results import (  # noqa: E402, F401 (re-exported: the studies use them through this module)
    batch_of,
    best_by_system,
    cap_of,
    card_of,
    finish_axes,
    latest_rows,
    mark_failures,
    new_figure,
    save,
    speedups,
    table,
)

BENCH = "experiments/bench_step.py"
DEEPSPEED = "experiments/baselines/deepspeed_gpt.py"
WHOLE_CARD_GIB = 75.6  # XLA's pool at bench_step's 0.95 of the H100's 79.6 GiB (the planner's h100-80g machine)
GIB = 2**30
HOST_RAM_GIB = 120.0  # usable RAM of the H100 machine (MACHINE.md): the baselines' prechecks refuse above it


@dataclasses.dataclass
class Run:
    """One configuration of a study: a child command, or (skip) the reason it is not run, which is its result."""

    label: str
    system: str
    model: str
    batches: tuple[int, ...]  # one row per batch (several only for the DeepSpeed runner's sweep)
    cap_gib: float  # GPU memory cap; 0 = the whole card
    argv: list[str]  # the child's command line, without --out/--experiment
    est_s: float  # estimated wall seconds on the H100 machine (start, init, compile, steps)
    extra: dict = dataclasses.field(default_factory=dict)  # keys added to its rows (variant, ...)
    skip: str = ""
    skip_status: str = "skipped"  # oom: a planner refusal is the configuration's result


# ---- children ----------------------------------------------------------------------------------------------
def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if _CALLER_JAX_PLATFORMS is not None:
        env["JAX_PLATFORMS"] = _CALLER_JAX_PLATFORMS
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO),
               PYTHONUNBUFFERED="1")
    # XLA's pinned cap is left to each child: bench_step caps it at its plan's need for lohan_jax (a 120 GiB default,
    # counted x1.1 in RAM, refused the ablation's all-swap run of 2026-11-26) and at 120 for the baselines
    return env


# ---- the planner -----------------------------------------------------------------------------------------------
PLANNER_MACHINE = "h100-80g"  # study_main's --machine: a built-in name or a profile `lohan-jax profile` saved


def planner_machine(cap_gib: float):
    from lohan_jax.planner import machine

    m = machine(PLANNER_MACHINE)
    return m.with_(hbm_gib=cap_gib) if cap_gib else m


# model -> (the file `lohan-jax profile` saved, its measured ModelProfile): measure_model_profiles. Planned runs use the
# profile, hand plans pass the file to bench_step (their pinned cap is sized from its kept-activation bytes)
MODEL_PROFILES: dict = {}


def workload(model: str, batch: int, seq: int = 1024):
    """The planner's workload: the model's measured profile where one was taken, else the analytic one."""
    from lohan_jax.models import get_spec
    from lohan_jax.planner import Workload, model_profile_from_spec

    mp = MODEL_PROFILES[model][1] if model in MODEL_PROFILES else None
    if mp is None or mp.seq_len != seq:
        mp = model_profile_from_spec(get_spec(model), seq)
    return Workload(mp, batch)


def measure_model_profiles(models, log_dir: Path, *, micro_batch: int = 8, dry_run: bool = False) -> dict:
    """Measure each model's per-block times on this GPU with `lohan-jax profile` (a child process: this one must
    not take the GPU) and plan with them; a failed measurement leaves the analytic profile, logged."""
    from lohan_jax.planner.profile import load_profile

    got = {}
    for model in models:
        out = log_dir / f"profile_{model}.json"
        argv = [sys.executable, "-m", "lohan_jax", "profile", "--quick", "--set", f"model.name={model}", "--set",
                f"train.batch_size={micro_batch}", "--set", "train.seq_len=1024", "--set", "train.engine=offload",
                "--out", str(out)]
        if dry_run:
            print(f"[profile {model}] ~45 s\n  {shlex.join(argv)}")
            continue
        log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log_dir / f"profile_{model}.log", "w") as f:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env(),
                                timeout=240).returncode
        if rc == 0 and out.exists():
            _, mp = load_profile(out)
            if mp is not None and mp.measured:
                got[model], MODEL_PROFILES[model] = mp, (out, mp)
                print(f"[profile {model}] measured in {time.monotonic() - t0:.0f} s: block fwd {mp.block_fwd_ms:.2f} "
                      f"ms, bwd (recompute) {mp.block_bwd_recompute_ms:.2f} ms at {mp.tokens_measured} tokens",
                      flush=True)
                continue
        print(f"[profile {model}] failed (rc {rc}, log {log_dir / f'profile_{model}.log'}): analytic profile",
              flush=True)
    return got


def planner_verdict(model: str, batch: int, cap_gib: float) -> dict:
    """The planner's answer for this configuration: its plan and prediction, or its refusal with the numbers."""
    from lohan_jax.plan_memory import pinned_pool_limit_gib
    from lohan_jax.planner import search, suggestions
    from lohan_jax.planner.capacity import memory

    wl, m = workload(model, batch), planner_machine(cap_gib)
    r = search(wl, m)
    if r.plan is None:
        return {"fits": False, "problems": list(r.problems), "suggestions": suggestions(wl, m)}
    # XLA's pinned pool grows up to its cap and never shrinks: capped at the plan's need + margin, as
    # `lohan-jax train` caps it (a 6B batch-32 plan was OOM-killed under a 120 GB cap: plan_memory)
    return {"fits": True, "executable": r.executable, "plan": r.plan, "predicted_step_s": r.prediction.step_s,
            "pinned_limit_gb": pinned_pool_limit_gib(memory(r.plan, wl).pinned_bytes),
            "predicted_tokens_per_s": r.prediction.tokens_per_s,
            "disk_gib": sum(1 for u in r.plan.units if u.optim_state.value == "disk")}


def predicted_for(row: dict, cap_gib: float) -> dict:
    """The planner's prediction for the plan a lohan_jax row actually ran, and the measured/predicted error."""
    from lohan_jax.plan import Plan
    from lohan_jax.planner import predict

    if not row.get("plan") or not row.get("step_s"):
        return {}
    plan = Plan.from_dict(json.loads(row["plan"]) if isinstance(row["plan"], str) else row["plan"])
    wl = dataclasses.replace(workload(row["model"], row["batch_tokens"] // row["seq_len"], row["seq_len"]),
                             clip=bool(row.get("clip_norm")))  # clipping defers every update past the backward
    pred = predict(plan, wl, planner_machine(cap_gib))
    return {"predicted_step_s": pred.step_s, "prediction_error": row["step_s"] / pred.step_s - 1.0}


# ---- run builders ---------------------------------------------------------------------------------------------
def _cap(cap_gib: float) -> list[str]:
    return ["--gpu-budget-gib", f"{cap_gib:g}"] if cap_gib else []


def _params_b(model: str) -> float:
    from lohan_jax.models import get_spec

    return get_spec(model).param_count() / 1e9


def lohan_run(model: str, batch: int, cap_gib: float, *, steps: int = 3, plan_dir: Path, label: str = "",
              extra_flags: tuple[str, ...] = (), peak: bool = False, planned: bool = True) -> Run:
    """lohan_jax through bench_step. planned: the planner's own plan (--plan-file); else bench_step's hand-plan
    flags in extra_flags. A configuration the planner refuses is recorded as that refusal."""
    label = label or f"lohan_jax {model} b{batch} {cap_gib or 'card'}"
    verdict = planner_verdict(model, batch, cap_gib)
    base = ["--system", "lohan_jax", "--model", model, "--batch", str(batch), "--steps", str(steps), *_cap(cap_gib),
            *([] if peak else ["--no-peak"]), *extra_flags]
    run = Run(label, "lohan_jax", model, (batch,), cap_gib, [], 0.0, {"planner_machine": planner_machine(0).name,
              "planner_model_profile": "measured" if model in MODEL_PROFILES else "analytic"})
    if not verdict["fits"]:
        run.skip, run.skip_status = ("refused by the planner (nothing fits this machine): "
                                     + "; ".join(verdict["problems"]) + ". Smallest changes: "
                                     + "; ".join(verdict["suggestions"])), "oom"
        run.extra["planner_refused"] = True
        return run
    flags = []
    if planned:
        if not verdict["executable"]:
            run.skip = ("the planner's only plan keeps weights on disk, which the engine cannot run yet "
                        f"(planner: {verdict['predicted_step_s']:.1f} s/step predicted)")
            return run
        path = plan_dir / f"{_slug(label)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        verdict["plan"].save(path)
        flags = ["--plan-file", str(path), "--pinned-limit-gb", f"{verdict['pinned_limit_gb']:.0f}"]
        if verdict["disk_gib"]:
            flags += ["--disk-path", f"/tmp/lohan_state_{_slug(label)}"]
    elif model in MODEL_PROFILES:
        flags = ["--model-profile", str(MODEL_PROFILES[model][0])]
    step_est = verdict["predicted_step_s"]
    run.argv = [sys.executable, BENCH, *base, *flags]
    run.est_s = 25 + 9.5 * _params_b(model) + (steps + 1) * step_est * 1.2 + (15 if peak else 0)
    return run


def reference_run(model: str, batch: int, *, steps: int = 4, remat: bool = False) -> Run:
    """The all-in-HBM reference trainer on the whole card: 16 B/param + activations, all of them unless remat
    (each block recomputed in the backward, as lohan_jax's recompute policy)."""
    p = _params_b(model)
    step = (8 if remat else 6) * p * 1e9 * batch * 1024 / 400e12
    return Run(f"reference {model} b{batch} card" + (" remat" if remat else ""), "reference", model, (batch,), 0.0,
               [sys.executable, BENCH, "--system", "reference", "--model", model, "--batch", str(batch),
                "--steps", str(steps), *(["--remat"] if remat else [])], 20 + 5 * p + (steps + 1) * step,
               {"remat": remat})


def native_run(model: str, batch: int, cap_gib: float, *, steps: int = 3, micro: int = 1) -> Run:
    """jax_native_offload (lohan_jax/baselines) through bench_step; micro > 1: the batch as that many
    accumulated micro-batches in its one jitted step (how a JAX user grows the batch past the HBM)."""
    p = _params_b(model)
    argv = [sys.executable, BENCH, "--system", "jax_native_offload", "--model", model, "--batch", str(batch),
            "--steps", str(steps), *_cap(cap_gib), "--no-peak", *(["--micro", str(micro)] if micro > 1 else [])]
    # fp32 params and Adam state cross PCIe both ways every step (12 B/param each way, ~70 GB/s duplex)
    step = max(24 * p * 1e9 / 70e9, 8 * p * 1e9 * batch * 1024 / 400e12)
    est = 30 if 12 * p * 1e9 > HOST_RAM_GIB * GIB else 40 + 12 * p + (steps + 1) * step  # refused at its precheck
    return Run(f"jax_native_offload {model} b{batch} {cap_gib or 'card'}" + (f" x{micro} micro" if micro > 1 else ""),
               "jax_native_offload", model, (batch,), cap_gib, argv, est)


def deepspeed_run(system: str, model: str, batches: tuple[int, ...], cap_gib: float, *, steps: int = 3,
                  log_dir: Path, first_build: bool = True) -> Run:
    """A DeepSpeed configuration swept over `batches` in one process (one engine build, one cpu_adam JIT build)."""
    p = _params_b(model)
    label = f"{system} {model} b{','.join(map(str, batches))} {cap_gib or 'card'}"
    # DeepSpeed's CPU Adam over all parameters every step (~1.5 G params/s assumed), plus fwd/bwd with recompute
    step = sum(p / 1.5 + 8 * p * 1e9 * b * 1024 / 300e12 for b in batches)
    argv = [sys.executable, DEEPSPEED, "--system", system, "--model", model, "--batch", ",".join(map(str, batches)),
            "--steps", str(steps), *_cap(cap_gib), "--log", str(log_dir / f"{_slug(label)}.child.log")]
    refused = {"deepspeed_zero_offload": 16, "deepspeed_zero3_cpu": 18}[system] * p * 1e9 > HOST_RAM_GIB * GIB
    return Run(label, system, model, tuple(batches), cap_gib, argv,
               10 if refused else 30 + (75 if first_build else 0) + 10 * p + steps * step)


TIMELINE_S = 15.0  # per batch (a guess): a baseline's one more step, traced; the trace's conversion and PNG


def with_timelines(runs: list[Run], model: str, out_dir: Path) -> list[Run]:
    """--timeline out_dir on each system's first configuration of `model` (priority order): one step's timeline
    per system, side by side (issue 6). out_dir is the children's (their cwd is the repository)."""
    traced = set()
    for r in runs:
        if r.model == model and r.argv and not r.skip and r.system not in traced:
            traced.add(r.system)
            r.argv = [*r.argv, "--timeline", str(out_dir)]
            r.est_s += TIMELINE_S * len(r.batches)
    return runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


# ---- execution ------------------------------------------------------------------------------------------------
def execute(runs: list[Run], *, experiment: str, out: Path, log_dir: Path, budget_s: float,
            dry_run: bool) -> list[dict]:
    """Run each configuration in order within `budget_s`; append one row per batch to `out`; return the rows."""
    from lohan_jax.metrics import append_result

    if dry_run:
        total = 0.0
        for r in runs:
            total += 0 if r.skip else r.est_s
            head = f"[{r.label}] ~{r.est_s:.0f} s" if not r.skip else f"[{r.label}] not run ({r.skip_status}): {r.skip}"
            print(head + ("" if r.skip else "\n  " + shlex.join(_with_out(r.argv, experiment, "ROWS.jsonl"))))
        print(f"estimated total {total:.0f} s of a {budget_s:.0f} s budget (runs past the budget are skipped)")
        return []
    log_dir.mkdir(parents=True, exist_ok=True)
    t_start, rows = time.monotonic(), []
    for r in runs:
        left = budget_s - (time.monotonic() - t_start)
        if not r.skip and r.est_s > left:
            r.skip = f"study time budget: ~{r.est_s:.0f} s estimated, {max(left, 0):.0f} s of {budget_s:.0f} left"
        got = [_skip_row(r, b, experiment) for b in r.batches] if r.skip else _run_child(r, experiment, log_dir, left)
        for row in got:
            row = {**row, **{k: v for k, v in r.extra.items() if k not in row}, "label": r.label}
            if row.get("system") == "lohan_jax" and row.get("status") == "ok":
                row.update(predicted_for(row, r.cap_gib))
            row.setdefault("device", _gpu_name())
            rows.append(append_result(out, row))
            _print_row(rows[-1], time.monotonic() - t_start)
    return rows


def _with_out(argv: list[str], experiment: str, out: str) -> list[str]:
    return [*argv, "--experiment", experiment, "--out", out]


def _skip_row(r: Run, batch: int, experiment: str) -> dict:
    return {"experiment": experiment, "system": r.system, "model": r.model, "params": int(_params_b(r.model) * 1e9),
            "seq_len": 1024, "batch_tokens": batch * 1024, "gpu_budget_gib": r.cap_gib or None, "n_gpus": 1,
            "status": r.skip_status, "error": r.skip, "attempted": False, "command": shlex.join(r.argv) or None}


def _run_child(r: Run, experiment: str, log_dir: Path, left_s: float) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="study_")) / "rows.jsonl"
    log = log_dir / f"{_slug(r.label)}.log"
    argv = _with_out(r.argv, experiment, str(tmp))
    if "--timeout" not in argv and r.argv[1] == DEEPSPEED:
        argv += ["--timeout", f"{max(left_s - 15, 30):.0f}"]
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(oom_first(argv), stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(left_s, 30))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in tmp.read_text().splitlines() if line.strip()] if tmp.exists() else []
    for row in rows:
        row.setdefault("wall_s", round(wall, 1))
        row["log"] = str(log)
    if len(rows) >= len(r.batches):
        return rows
    if rc is None:
        status, error = "skipped", f"stopped at the study's time budget after {wall:.0f} s: not measured"
    elif rc == -signal.SIGKILL:
        status, error = "oom", f"killed by SIGKILL after {wall:.0f} s: the host's OOM killer (no other sender here)"
    else:
        tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
        status, error = "failed", f"exited with {rc} and wrote no row: {tail}"
    lost = [{**_skip_row(r, b, experiment), "status": status, "error": error, "attempted": True,
             "wall_s": round(wall, 1), "log": str(log)} for b in r.batches[len(rows):]]
    return rows + lost


def oom_first(argv: list[str]) -> list[str]:
    """argv run by a shell that first makes itself (then exec's the command) the host OOM killer's first choice:
    no preexec_fn, which would fork a process that has jax's threads."""
    return ["sh", "-c", 'echo 1000 > /proc/self/oom_score_adj 2>/dev/null; exec "$@"', "sh", *argv]


@functools.lru_cache(maxsize=1)
def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _print_row(row: dict, elapsed: float) -> None:
    tok = f"{row['tokens_per_s']:,.0f} tok/s, {row.get('tflops_6n', 0):.0f} TFLOPS(6N)" if row.get("tokens_per_s") \
        else str(row.get("error", ""))[:160]
    print(f"[{elapsed:5.0f}s] {row.get('label', row['system'])} b{batch_of(row)}: {row['status']}: {tok}",
          flush=True)


# ---- the command line every study shares -------------------------------------------------------------------
def study_main(argv, *, experiment: str, doc: str, build_runs, plot, budget_s: float = 560.0) -> int:
    """--dry-run prints the commands and the estimate; --plot-only redraws from the JSONL; otherwise run, append,
    print the table and the ratios, draw. build_runs(args, plan_dir, log_dir) -> [Run]; plot(rows, png)."""
    import argparse

    global _CALLER_JAX_PLATFORMS, PLANNER_MACHINE
    t_start = time.monotonic()  # the budget covers the planning below too
    _CALLER_JAX_PLATFORMS = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"  # the planner imports jax: this process must never take the GPU

    p = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print each run's command and time estimate; run nothing")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot and table from the JSONL; run nothing")
    p.add_argument("--full", action="store_true", help="every configuration, not only the default set")
    p.add_argument("--only", default="", help="comma-separated systems to run (e.g. lohan_jax,deepspeed_zero_offload)")
    p.add_argument("--labels", default="", help="comma-separated substrings: run only the configurations whose "
                   "label contains one (e.g. 'b32,gpt3-1.3b'); --dry-run lists the labels")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run; the first is the warm-up "
                   "(bench_step times the rest, drained: the more steps, the less pipeline fill and drain in the mean)")
    p.add_argument("--budget-s", type=float, default=budget_s,
                   help="wall seconds for the whole study (planning included); runs whose estimate does not fit "
                        "what is left are skipped, a child still running at the end is stopped")
    p.add_argument("--out", default=f"experiments/results/{experiment}.jsonl")
    p.add_argument("--plot", default="", help="PNG path (default: beside --out)")
    p.add_argument("--log-dir", default=f"/tmp/lohan_studies/{experiment}", help="children's logs and plans")
    p.add_argument("--machine", default=PLANNER_MACHINE, help="the planner's machine: a built-in name or a profile "
                   "saved by `lohan-jax profile --no-model --out F` on this machine (e.g. the H200)")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (the first is the warm-up; the mean is over the rest)")
    PLANNER_MACHINE = args.machine
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    if not args.plot_only:
        log_dir = Path(args.log_dir)
        runs = build_runs(args, log_dir / "plans", log_dir)
        if args.only:
            keep = set(args.only.split(","))
            runs = [r for r in runs if r.system in keep]
        if args.labels:
            runs = [r for r in runs if any(part in r.label for part in args.labels.split(","))]
        left = args.budget_s - (time.monotonic() - t_start)
        new = execute(runs, experiment=experiment, out=out, log_dir=log_dir, budget_s=left, dry_run=args.dry_run)
        if args.dry_run:
            return 0
        for model in sorted({r["model"] for r in new}):
            ratios = speedups(new, model)
            if ratios:
                from lohan_jax.metrics import append_result

                best = best_by_system(new, model)["lohan_jax"]
                append_result(out, {"experiment": experiment, "system": "lohan_jax", "model": model,
                                    "variant": "summary", "batch_tokens": best["batch_tokens"],
                                    "gpu_budget_gib": best.get("gpu_budget_gib"), "tokens_per_s": best["tokens_per_s"],
                                    **ratios, "status": "ok", "device": _gpu_name()})
                print(f"{model}: lohan_jax best {best['tokens_per_s']:,.0f} tokens/s; "
                      + ", ".join(f"{k[len('speedup_vs_'):]} x{v:.2f}" for k, v in ratios.items()))
    rows = latest_rows(out, experiment)
    print(table([r for r in rows if r.get("variant") != "summary"]))
    if rows:
        plot(rows, png)
    return 0
