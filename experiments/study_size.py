"""Question: how do TFLOPS (6N and the paper's convention) change with the model size (GPT-3 1.3B and 2.7B, the
paper's 6B and 13B) at each system's best batch, lohan_jax on a 24 GiB cap beside DeepSpeed ZeRO-3 CPU,
jax_native_offload (both on the same cap) and the all-in-HBM reference (whole card, where it fits), measured in
the same run?

Best batch: lohan_jax 64 x 1024 (its throughput grows with the batch: study_batch); ZeRO-3 swept over 8/16/32 in
one process (its best is kept); jax_native_offload and the reference 8 (they hold fp32 state on the device during
the step; jax_native_offload 1.3B also at 32 and 64 as accumulated micro-batches of 8, its weights fetched once a
step). Default set, in priority order, within one GPU-machine call (~9 min on the H100): lohan_jax 1.3B, 2.7B, 6B;
13B as the planner's verdict and the baselines' host-RAM prechecks; then the baselines from the smallest model up
(1.3B: ZeRO-3, jax_native_offload, reference; 2.7B; ZeRO-3 6B), as far as the time budget goes. Each system's
1.3B configuration also writes one step's timeline (PNG, trace) to timelines/ beside --out. --run-13b adds the
13B run itself (whole card, batch 8, the planner's plan with optimizer state partly on disk; ~6-9 min alone,
so give it its own call: --only lohan_jax --run-13b).

  python experiments/study_size.py                 # run (GPU machine), append, table, plot
  python experiments/study_size.py --dry-run       # the commands and the time estimate
  python experiments/study_size.py --plot-only     # redraw experiments/results/throughput_vs_size.png
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_runner as sr  # noqa: E402

EXPERIMENT = "throughput_vs_size"
MODELS = ("gpt3-1.3b", "gpt3-2.7b", "paper-6b", "paper-13b")
CAP_GIB = 24.0
LOHAN_BATCH, BASELINE_BATCH = 64, 8


# planned from per-block times measured on this GPU first (`lohan-jax profile`, ~45 s each): the analytic profile's
# one block rate (measured on 6B shapes) predicted 1.3B 37-41% short and 2.7B (head dim 80) 2.41 s for 4.04 measured
PROFILED = ("gpt3-1.3b", "gpt3-2.7b")


def build_runs(args, plan_dir: Path, log_dir: Path) -> list[sr.Run]:
    steps = args.steps
    if not args.only or "lohan_jax" in args.only.split(","):  # only the models this call runs
        parts = [x for x in args.labels.split(",") if x]
        sr.measure_model_profiles([m for m in PROFILED if not parts or any(x in m for x in parts)], log_dir,
                                  dry_run=args.dry_run)
    lohan = lambda model, cap=CAP_GIB, **kw: sr.lohan_run(model, LOHAN_BATCH, cap, steps=steps, plan_dir=plan_dir, **kw)
    zero3 = lambda model, batches, first: sr.deepspeed_run("deepspeed_zero3_cpu", model, batches, CAP_GIB, steps=steps,
                                                           log_dir=log_dir, first_build=first)
    native = lambda model: sr.native_run(model, BASELINE_BATCH, CAP_GIB, steps=steps)
    runs = [lohan("gpt3-1.3b"), lohan("gpt3-2.7b"), lohan("paper-6b")]
    # 13B: the planner's verdict at 24 GiB (refused) and on the whole card; the baselines' prechecks (seconds)
    runs.append(lohan("paper-13b"))
    whole = sr.lohan_run("paper-13b", 8, 0.0, steps=steps, plan_dir=plan_dir)  # b64 does not fit its RAM
    if not args.run_13b and not whole.skip:
        whole.skip = f"not run without --run-13b: optimizer state on disk, ~{whole.est_s:.0f} s for this run"
    runs += [whole, zero3("paper-13b", (8,), False),
             sr.deepspeed_run("deepspeed_zero_offload", "paper-13b", (8,), CAP_GIB, steps=steps, log_dir=log_dir,
                              first_build=False),
             sr.native_run("paper-13b", BASELINE_BATCH, 0.0, steps=steps)]
    # the baselines, smallest model first; what the budget does not reach is recorded as skipped
    runs += [zero3("gpt3-1.3b", (8, 16, 32), True), native("gpt3-1.3b"),
             sr.native_run("gpt3-1.3b", 32, CAP_GIB, steps=steps, micro=4),  # its best batch: 8s accumulated
             sr.native_run("gpt3-1.3b", 64, CAP_GIB, steps=steps, micro=8),
             sr.reference_run("gpt3-1.3b", BASELINE_BATCH, steps=max(steps, 4)),
             native("gpt3-2.7b"), zero3("gpt3-2.7b", (8, 16, 32), False),
             sr.reference_run("gpt3-2.7b", BASELINE_BATCH, steps=max(steps, 4)),
             zero3("paper-6b", (8, 16), False)]  # ~100 GiB of host RAM: may be killed (a result too)
    return sr.with_timelines(runs, "gpt3-1.3b", Path(args.out).parent / "timelines")  # beside the rows


COLORS = {"lohan_jax": "tab:blue", "deepspeed_zero_offload": "tab:orange", "deepspeed_zero3_cpu": "tab:red",
          "jax_native_offload": "tab:green", "reference": "tab:gray"}


def plot(rows: list[dict], png: Path) -> None:
    fig, (ax,) = sr.new_figure(1, "TFLOPS (6N) at each system's best batch vs model size (24 GiB cap; reference: "
                                  "whole card)\nx = OOM / refused / failed")
    size = {m: i for i, m in enumerate(MODELS)}
    for system in sorted({r["system"] for r in rows if not r.get("variant")}):
        color = COLORS.get(system, "black")
        pts, bad = [], []
        for model in MODELS:
            mine = [r for r in rows if r["system"] == system and r.get("model") == model and not r.get("variant")]
            ok = [r for r in mine if r.get("status") == "ok" and r.get("tflops_6n")]
            if ok:
                pts.append((size[model], max(r["tflops_6n"] for r in ok)))
            elif any(r.get("status") in ("oom", "failed") for r in mine):
                bad.append((size[model], next(r["status"] for r in mine if r.get("status") in ("oom", "failed"))))
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=color, label=system)
        sr.mark_failures(ax, [x for x, _ in bad], [s for _, s in bad], color, "" if pts else system)
    ax.set_xticks(range(len(MODELS)), MODELS)
    sr.finish_axes(ax, "TFLOPS (6N model FLOPs)")
    sr.save(fig, png)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_13b = "--run-13b" in argv
    if run_13b:
        argv.remove("--run-13b")

    def build(args, plan_dir, log_dir):
        args.run_13b = run_13b
        return build_runs(args, plan_dir, log_dir)

    return sr.study_main(argv, experiment=EXPERIMENT, doc=__doc__, build_runs=build, plot=plot)


if __name__ == "__main__":
    sys.exit(main())
