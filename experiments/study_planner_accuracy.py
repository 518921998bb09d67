"""Question: how close is the planner's predicted step time to the measured one, for the planner's own plans, over
two model sizes (GPT-3 1.3B, the paper's 6B), both GPU budgets (24 GiB, the paper's card, and the whole card) and
two batches (8 and 32 x 1024 tokens)? Target (issue 5): within 10% for every run. Also answers whether the
planner's plan reaches 8,000 tokens/s on the whole card and 5,000 at 24 GiB for 6B at batch 8.

Each run is bench_step.py with `--plan-file` (the plan `lohan-jax plan` would print for the h100-80g machine at
that cap); the row carries the planner's prediction for the plan it ran and the error (measured / predicted - 1).
Models in PROFILED are planned from their per-block times measured first on this GPU (`lohan-jax profile`), the
others from the machine's block rate. Each run caps XLA's pinned pool at the plan's need (study_runner). Default
set, within one GPU-machine call (~9 min on the H100): the 1.3B runs first (short), then 6B.

  python experiments/study_planner_accuracy.py                 # run (GPU machine), append, table, plot
  python experiments/study_planner_accuracy.py --dry-run       # the commands and the time estimate
  python experiments/study_planner_accuracy.py --plot-only     # redraw experiments/results/planner_accuracy.png

The figure and the printed table also hold every other study's lohan_jax runs (throughput_vs_batch, _size,
ablation: their rows carry the planner's prediction for the plan they ran), so --plot-only answers issue 6's
"predicted vs measured step time for every run".
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_runner as sr  # noqa: E402

EXPERIMENT = "planner_accuracy"
MODELS = ("gpt3-1.3b", "paper-6b")
CAPS = (24.0, 0.0)  # 0: the whole card
BATCHES = (8, 32)
TOLERANCE = 0.10
# Models planned from per-block times measured on this GPU (`lohan-jax profile`, ~45 s each) instead of the machine's
# one block rate (613 TFLOP/s, measured on 6B shapes): 1.3B's hidden 2048 runs its blocks at a lower rate, and the
# analytic profile predicted its steps 37-41% short (2026-11-25 18:10 UTC, H100).
PROFILED = ("gpt3-1.3b",)


def build_runs(args, plan_dir: Path, log_dir: Path) -> list[sr.Run]:
    sr.measure_model_profiles(PROFILED, log_dir, dry_run=args.dry_run)
    return [sr.lohan_run(model, batch, cap, steps=args.steps, plan_dir=plan_dir)
            for model in MODELS for cap in CAPS for batch in BATCHES]


# every other study's lohan_jax rows carry the planner's prediction for the plan they ran (issue 6: planner accuracy
# for every run): the figure and the table show them beside this study's own
OTHER_STUDIES = ("throughput_vs_batch", "throughput_vs_size", "ablation")
COLORS = {EXPERIMENT: "tab:blue", "throughput_vs_batch": "tab:orange", "throughput_vs_size": "tab:green",
          "ablation": "tab:purple"}


def predicted_rows(own: list[dict], results_dir: Path = sr.REPO / "experiments" / "results") -> list[dict]:
    """The runs with a prediction and a measurement: this study's rows and the newest of each other study's."""
    rows = list(own)
    for name in OTHER_STUDIES:
        rows += sr.latest_rows(results_dir / f"{name}.jsonl", name)
    return [r for r in rows if r.get("status") == "ok" and r.get("predicted_step_s") and r.get("step_s")]


def _label(r: dict) -> str:
    variant = f" {r['variant']}" if r.get("variant") else ""
    return f"{r['model']} b{sr.batch_of(r)} {sr.cap_of(r) or 'card'}{variant}"


def plot(rows: list[dict], png: Path) -> None:
    ok = predicted_rows(rows)
    fig, (ax,) = sr.new_figure(1, f"planner: predicted vs measured step time, every study's lohan_jax runs "
                                  f"(band: +/-{TOLERANCE:.0%}; circles 24 GiB, squares whole card)")
    hi = max([max(r["predicted_step_s"], r["step_s"]) for r in ok] + [1.0]) * 1.15
    xs = [0.05, hi]
    ax.plot(xs, xs, color="black", lw=0.8)
    ax.fill_between(xs, [x * (1 - TOLERANCE) for x in xs], [x * (1 + TOLERANCE) for x in xs], color="gray", alpha=0.2)
    for name, color in COLORS.items():
        mine = [r for r in ok if r.get("experiment") == name]
        for k, r in enumerate(mine):
            ax.scatter(r["predicted_step_s"], r["step_s"], color=color, marker="o" if sr.cap_of(r) else "s",
                       label=name if k == 0 else None)
            ax.annotate(_label(r), (r["predicted_step_s"], r["step_s"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted step time (s)")
    ax.set_ylabel("measured step time (s, median after the first)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    sr.save(fig, png)
    within = 0
    for r in sorted(ok, key=lambda r: (r["experiment"], r["model"], sr.batch_of(r))):
        err = r["step_s"] / r["predicted_step_s"] - 1
        within += abs(err) <= TOLERANCE
        print(f"{r['experiment']:<20} {_label(r):<40} measured {r['step_s']:7.3f} s, predicted "
              f"{r['predicted_step_s']:7.3f} s, error {err:+7.1%} ({'within' if abs(err) <= TOLERANCE else 'OUTSIDE'} "
              f"{TOLERANCE:.0%}; profile {r.get('planner_model_profile', '-')})")
    print(f"{within} of {len(ok)} runs within {TOLERANCE:.0%}")


def main(argv=None) -> int:
    return sr.study_main(argv, experiment=EXPERIMENT, doc=__doc__, build_runs=build_runs, plot=plot)


if __name__ == "__main__":
    sys.exit(main())
