"""Question: what does each of the paper's ideas buy on this machine, measured in one run? (1) The optimizer
overlapped with the backward (active gradient offloading) against the optimizer after the backward, either
overlapping the next forward or strictly in between (the paper's naive "backward then optimizer"); (2) the
activation policy: all-recompute against all-swap against the planner's plan; (3) the disk tier: optimizer state
of some blocks on disk against all of it in RAM.

Where on this machine each idea matters (planner predictions, experiments/results/planner_testbed.jsonl): the CPU
optimizer is the wall at small batches, so (1) and (3) run the paper's 6B at batch 8 on a 24 GiB cap with every
block's state on the host; all-swap does not fit 6B's RAM at any batch here, so (2) runs GPT-3 2.7B at batch 16.
"After the backward" is bench_step's --clip-norm 1e9 (never scales, but every update waits for the whole
backward), "serial" adds --sync-updates (each step waits for its updates); "planned" runs the planner's own plan
(--plan-file). The disk tier also runs in the paper's naive I/O order (--disk-io-order naive: each block's read
issued only as its update starts, behind the previous block's write: read i, Adam i, write i, read i-1) against
the default reordered one (reads issued ahead of the updates). ~11 min estimated on the H100, past the default
560 s budget: if the estimates hold, the last run (opt:after_backward) is skipped; pass --budget-s to change it.

  python experiments/study_ablation.py              # run (GPU machine), append, table, plot
  python experiments/study_ablation.py --dry-run    # the commands and the time estimate
  python experiments/study_ablation.py --plot-only  # redraw experiments/results/ablation.png
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_runner as sr  # noqa: E402

EXPERIMENT = "ablation"
CAP_GIB = 24.0
OPT_MODEL, OPT_BATCH = "paper-6b", 8
ACT_MODEL, ACT_BATCH = "gpt3-2.7b", 16
NEVER_CLIPS = "1e9"  # clip_by_global_norm that never scales: same updates, but every one waits for the backward
GROUPS = {"opt": "optimizer vs backward (6B, b8, 24 GiB)", "act": "activations (2.7B, b16, 24 GiB)",
          "disk": "disk tier (6B, b8, 24 GiB)"}


def build_runs(args, plan_dir: Path, log_dir: Path) -> list[sr.Run]:
    def hand(variant, model, batch, flags=(), extra=None):
        run = sr.lohan_run(model, batch, CAP_GIB, steps=args.steps, plan_dir=plan_dir, planned=False,
                           label=f"ablation {variant}", extra_flags=tuple(flags))
        run.extra.update(variant=variant, **(extra or {}))
        return run

    host_only = ("--activations", "recompute", "--swap-input-blocks", "0")  # every block's state on the host
    if not args.labels or any(x in "act:planned" for x in args.labels.split(",") if x):
        # plan from block times measured on this GPU: with the analytic profile (one 613 TFLOP/s rate) the plan of
        # 2026-11-26 predicted 0.60 s for itself and 0.73 for all-recompute, and ran 0.72 against 0.68
        sr.measure_model_profiles((ACT_MODEL,), log_dir, dry_run=args.dry_run)
    planned = sr.lohan_run(ACT_MODEL, ACT_BATCH, CAP_GIB, steps=args.steps, plan_dir=plan_dir,
                           label="ablation act:planned")
    planned.extra["variant"] = "act:planned"
    on_disk = (*host_only, "--disk-state-blocks", "0:4", "--disk-path", "/tmp/lohan_ablation_disk")
    disk = hand("disk:4_blocks_on_disk", OPT_MODEL, OPT_BATCH, (*on_disk, "--measure-disk-gib", "2"))
    disk.est_s += 3 * 8.0  # ~20 GB of state read and written per step at ~2-2.6 GB/s, partly hidden
    naive = hand("disk:naive_io_order", OPT_MODEL, OPT_BATCH, (*on_disk, "--disk-io-order", "naive"),
                 extra={"disk_io_order": "naive"})
    naive.est_s += 3 * 10.0  # the same disk traffic, with every read now on the optimizer's critical path
    return [hand("opt:overlapped", OPT_MODEL, OPT_BATCH, host_only),
            hand("act:recompute", ACT_MODEL, ACT_BATCH, host_only),
            hand("act:all_swap", ACT_MODEL, ACT_BATCH, ("--activations", "keep+swap+swap_input")),
            planned,
            hand("opt:after_backward_serial", OPT_MODEL, OPT_BATCH, (*host_only, "--clip-norm", NEVER_CLIPS,
                 "--sync-updates"), extra={"clip_norm": float(NEVER_CLIPS)}),
            disk, naive,
            hand("opt:after_backward", OPT_MODEL, OPT_BATCH, (*host_only, "--clip-norm", NEVER_CLIPS),
                 extra={"clip_norm": float(NEVER_CLIPS)})]


def plot(rows: list[dict], png: Path) -> None:
    fig, axes = sr.new_figure(len(GROUPS), "Ablations: tokens/s per variant (hatched: not run / failed, with why)")
    by_variant = {r["variant"]: r for r in rows if r.get("variant")}
    if "opt:overlapped" in by_variant:  # the disk tier's reference is the same configuration with state in RAM
        by_variant.setdefault("disk:all_in_ram", by_variant["opt:overlapped"])
    for ax, (group, title) in zip(axes, GROUPS.items(), strict=True):
        names = sorted((v for v in by_variant if v.startswith(group + ":")),
                       key=lambda v: (v not in ("opt:overlapped", "act:recompute", "disk:all_in_ram"), v))
        for i, v in enumerate(names):
            r = by_variant[v]
            ok = r.get("status") == "ok" and r.get("tokens_per_s")
            ax.bar(i, r["tokens_per_s"] if ok else 0, color="tab:blue" if ok else "none", edgecolor="tab:blue",
                   hatch=None if ok else "//")
            ax.annotate(f"{r['tokens_per_s']:,.0f}" if ok else r.get("status", "?"), (i, r.get("tokens_per_s") or 0),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        ax.set_xticks(range(len(names)), [n.split(":", 1)[1] for n in names], rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("tokens/s")
        ax.grid(axis="y", alpha=0.3)
    sr.save(fig, png)
    base = {g: by_variant.get(b) for g, b in (("opt", "opt:overlapped"), ("act", "act:recompute"),
                                               ("disk", "disk:all_in_ram"))}
    for v, r in sorted(by_variant.items()):
        b = base.get(v.split(":")[0])
        if b and b is not r and r.get("tokens_per_s") and b.get("tokens_per_s"):
            print(f"{v}: {r['tokens_per_s'] / b['tokens_per_s']:.2f}x the {b['variant']} throughput")


def main(argv=None) -> int:
    return sr.study_main(argv, experiment=EXPERIMENT, doc=__doc__, build_runs=build_runs, plot=plot)


if __name__ == "__main__":
    sys.exit(main())
