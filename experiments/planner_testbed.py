"""Question: what does our planner predict on the paper's testbed (RTX 4090, PCIe 4, 2x Xeon Gold 5320,
768/256/128 GB RAM, 12 SSDs), and how does that compare with the paper's published figures?

No GPU: the machine is described by hand (lohan_jax/planner/machines.py, configs/machines/paper-4090-*.yaml).
For each workload two predictions: the plan our planner picks for our engine (with its LM head), and the
paper's placement (every block's optimizer state on the SSDs, CPU Adam, no head: the artifact trains a headless
model). Writes experiments/results/planner_testbed.jsonl (one row per prediction) and planner_testbed.md.

  python experiments/planner_testbed.py
"""
from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lohan_jax.metrics import append_result  # noqa: E402
from lohan_jax.models import get_spec  # noqa: E402
from lohan_jax.planner.explain import bottleneck  # noqa: E402
from lohan_jax.planner.machines import BUILTIN  # noqa: E402
from lohan_jax.planner.paper import paper_step_s  # noqa: E402
from lohan_jax.planner.profile import ModelProfile, model_profile_from_spec  # noqa: E402
from lohan_jax.planner.search import PlanResult, SearchOptions, search, suggestions  # noqa: E402
from lohan_jax.planner.workload import Workload  # noqa: E402

OUT = ROOT / "experiments" / "results"
PAPER_13B = {8: 412, 16: 811, 32: 1376, 64: 1500, 128: 1479}  # tokens/s (PAPER.md)
PAPER_175B_TFLOPS = 86.9  # at its best batch (~62 tokens/s)
PAPER_LARGEST = {128: "70B", 256: "276B"}  # batch 1 (PAPER.md); 768 GB: 276B+ too
SIZES = ["paper-6b", "paper-13b", "paper-30b", "paper-70b", "paper-135b", "paper-175b", "paper-276b", "paper-412b"]


def headless(mp: ModelProfile) -> ModelProfile:
    """The paper's artifact: blocks only (MSE loss on the last hidden state), no embedding, no LM head."""
    return dataclasses.replace(mp, embed_params=0, head_params=0, head_flops_per_token=0.0, vocab_size=1, tied=False)


def summary(r: PlanResult) -> str:
    from collections import Counter
    c = Counter(f"{u.weights.value}/{u.optim_state.value}/{u.update_on.value} {u.activations.describe()}"
                for u in r.plan.blocks)
    return "; ".join(f"{n}x {k}" for k, n in c.most_common(3)) + (" ..." if len(c) > 3 else "")


def predict_row(model: str, batch: int, machine: str, variant: str, paper_tps: float | None,
                hbm_what_if: bool = False) -> dict:
    m = BUILTIN[machine]
    mp = model_profile_from_spec(get_spec(model), 1024)
    opts = SearchOptions()
    if variant == "paper_placement":
        mp, opts = headless(mp), SearchOptions(force_state="disk")
    wl = Workload(mp, batch)
    r = search(wl, m, opts)
    row = {"experiment": "planner_testbed", "system": "lohan_jax_planner", "variant": variant, "model": model,
           "params": mp.param_count, "seq_len": 1024, "batch_tokens": wl.tokens, "gpu_budget_gib": m.hbm_gib,
           "n_gpus": 1, "machine": machine}
    if paper_tps is not None:
        row.update(paper_tokens_per_s=paper_tps, paper_tflops=paper_tps * wl.flops_paper_per_token() / 1e12)
    if variant == "paper_placement":  # what the paper's own formula says for its placement
        t, swap = paper_step_s(wl, m)
        row.update(paper_model_step_s=t, paper_model_tokens_per_s=wl.tokens / t, paper_model_swap_gb=swap / 1e9)
    if r.plan is None and hbm_what_if:  # how fast it would be with just enough GPU memory
        fixes = suggestions(wl, m, opts)
        row["fits"] = False
        row["smallest_changes"] = fixes
        need = next((float(s.split(":")[1].split("GiB")[0]) for s in fixes if s.startswith("more GPU memory")), None)
        if need is not None:
            r = search(wl, m.with_(hbm_gib=need), opts)
            row["what_if_hbm_gib"] = need
    if r.plan is None:
        row.update(status="oom", error="; ".join(r.problems))
        return row
    p = r.prediction
    resource, _ = bottleneck(r.plan, wl, r.machine, p)
    row.update(predicted_step_s=p.step_s, tokens_per_s=p.tokens_per_s, tflops_paper=p.tflops_paper,
               tflops_6n=p.tflops_6n, bottleneck=resource, executable=r.executable, plan_summary=summary(r),
               busy_s={k: round(v, 3) for k, v in p.busy_s.items()}, search_s=r.search_s,
               status="ok" if row.get("fits", True) else "what_if")
    return row


def h100_checks() -> list[dict]:
    """Our two measured H100 runs (experiments/results/engine_throughput.jsonl, paper-6b at a 24 GiB cap): the
    model fed the runs' measured block and head times and our measured rates, on the runs' hand plans; and
    what the planner's own plan is predicted to do on the same workload (to be measured)."""
    from lohan_jax.plan import uniform_plan
    from lohan_jax.planner.cost import predict

    m = BUILTIN["h100-80g"].with_(hbm_gib=24.0)
    out = []
    runs = ((8, 20.64, 57.45, 1.605, "recompute", 0), (64, 184.6, 472.1, 5.577, "recompute+chunks=8", 16))
    for batch, block_ms, head_ms, measured, acts, swap_inputs in runs:
        mp = model_profile_from_spec(get_spec("paper-6b"), 1024)
        mp = dataclasses.replace(mp, tokens_measured=batch * 1024, block_fwd_ms=block_ms / 4,
                                 block_bwd_keep_ms=block_ms / 2, block_bwd_recompute_ms=3 * block_ms / 4,
                                 head_ms=head_ms, embed_ms=1.6 * batch / 8, source="engine_throughput.jsonl")
        wl = Workload(mp, batch)
        plan = uniform_plan(28, activations=acts)
        if swap_inputs:
            plan = dataclasses.replace(plan, blocks=tuple(
                dataclasses.replace(u, activations=dataclasses.replace(u.activations, swap_input=i < swap_inputs))
                for i, u in enumerate(plan.blocks)))
        hand = predict(plan, wl, m)
        best = search(wl, m)
        out.append({"experiment": "planner_h100_check", "system": "lohan_jax_planner", "model": "paper-6b",
                    "params": mp.param_count, "seq_len": 1024, "batch_tokens": wl.tokens, "gpu_budget_gib": 24.0,
                    "n_gpus": 1, "machine": "h100-80g", "measured_step_s": measured,
                    "predicted_step_s": hand.step_s, "prediction_error": hand.step_s / measured - 1,
                    "hand_plan": acts + (f", inputs of the first {swap_inputs} blocks swapped" if swap_inputs else ""),
                    "planner_plan_predicted_step_s": best.prediction.step_s, "planner_plan_summary": summary(best),
                    "status": "ok"})
    return out


def largest(ram_gib: int, executable: bool) -> tuple[str, dict | None]:
    m = BUILTIN[f"paper-4090-{ram_gib}g"]
    best, best_row = "none", None
    for name in SIZES:
        mp = model_profile_from_spec(get_spec(name), 1024)
        r = search(Workload(mp, 1), m, SearchOptions(allow_disk=None))
        if r.plan is None or (executable and not r.executable):
            continue
        best, best_row = name, {"step_s": r.prediction.step_s, "tokens_per_s": r.prediction.tokens_per_s,
                                "bottleneck": bottleneck(r.plan, r.workload, m, r.prediction)[0]}
    return best, best_row


def _sha() -> str:
    """The checkout's commit, read from .git (this script never runs git)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = ROOT / ".git" / head[5:]
            if ref.exists():
                return ref.read_text().strip()
            for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
                if line.endswith(head[5:]):
                    return line.split()[0]
        return head
    except OSError:
        return "unrecorded"


def main() -> int:
    stamp = {"device": "none (machine described by hand)", "git_sha": _sha(),
             "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "command": "python experiments/planner_testbed.py"}
    rows = []
    for batch, tps in PAPER_13B.items():
        for variant in ("planner", "paper_placement"):
            rows.append(predict_row("paper-13b", batch, "paper-4090-768g", variant, tps))
    for batch in (8, 16):
        for variant in ("planner", "paper_placement"):
            row = predict_row("paper-175b", batch, "paper-4090-768g", variant, None, hbm_what_if=True)
            row["paper_tflops"] = PAPER_175B_TFLOPS
            rows.append(row)
    for row in rows:
        append_result(OUT / "planner_testbed.jsonl", {**row, **stamp})
    checks = h100_checks()
    for row in checks:
        append_result(OUT / "planner_testbed.jsonl", {**row, **stamp})
    capacity = []
    for ram in (128, 256, 768):
        exe, exe_row = largest(ram, True)
        anyw, any_row = largest(ram, False)
        row = {"experiment": "planner_testbed_capacity", "system": "lohan_jax_planner", "machine": f"paper-4090-{ram}g",
               "ram_gib": ram, "batch_tokens": 1024, "largest_executable": exe, "largest_with_disk_weights": anyw,
               "paper_largest": PAPER_LARGEST.get(ram, ">= 276B"), "executable_run": exe_row,
               "disk_weights_run": any_row,
               "status": "ok"}
        capacity.append(row)
        append_result(OUT / "planner_testbed.jsonl", {**row, **stamp})
    text = markdown(rows, capacity, stamp) + h100_markdown(checks)
    (OUT / "planner_testbed.md").write_text(text)
    print(text)
    return 0


def markdown(rows: list[dict], capacity: list[dict], stamp: dict) -> str:
    lines = [f"# Planner predictions on the paper's testbed ({stamp['date'][:10]}, {stamp['command']})", "",
             "Machine: `paper-4090-768g` (configs/machines/). *paper's formula*: Ratel's T_f + T_b (PAPER.md) at "
             "the swap amount its OB search picks, headless, state on SSD (lohan_jax/planner/paper.py). *planner's "
             "plan*: what our planner picks for our engine, LM head included. *paper's placement*: our engine model "
             "with every block's optimizer state on the SSDs, CPU Adam, headless (as the paper's artifact). TFLOPS "
             "in the paper's convention (96·L·h²·(1+S/6h) per token). [disk weights]: bf16 weights on SSD too "
             "(modelled, not executed by our engine).", "",
             "| model | batch | paper: measured tok/s | TFLOPS | paper's formula tok/s | ours, planner's plan: tok/s | "
             "TFLOPS | bottleneck | ours, paper's placement: tok/s | TFLOPS | bottleneck |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["batch_tokens"] // 1024), {})[r["variant"]] = r

    def cell(r: dict) -> str:
        if r.get("status") == "oom":
            return "does not fit | - | -"
        mark = "" if r.get("status") == "ok" else f" (if {r['what_if_hbm_gib']:.1f} GiB HBM)"
        mark += "" if r.get("executable", True) else " [disk weights]"
        return f"{r['tokens_per_s']:.0f}{mark} | {r['tflops_paper']:.1f} | {r['bottleneck']}"

    for (model, batch), v in by.items():
        p = v["planner"]
        ptps = f"{p['paper_tokens_per_s']:.0f}" if "paper_tokens_per_s" in p else "~62 (best batch)"
        paper = v["paper_placement"]
        formula = f"{paper['paper_model_tokens_per_s']:.0f}"
        head = f"| {model} | {batch} | {ptps} | {p['paper_tflops']:.1f} | {formula}"
        lines.append(f"{head} | {cell(p)} | {cell(paper)} |")
    lines += ["", "| RAM | paper: largest trainable (batch 1) | planner: largest our engine runs | planner: largest "
              "with bf16 weights on disk too (modelled only) |", "|---|---|---|---|"]
    for c in capacity:
        lines.append(f"| {c['ram_gib']} GB | {c['paper_largest']} | {c['largest_executable']} | "
                     f"{c['largest_with_disk_weights']} |")
    return "\n".join(lines) + "\n"


def h100_markdown(checks: list[dict]) -> str:
    lines = ["", "Our H100 (paper-6b, 24 GiB cap), the model fed the runs' measured block/head times and our measured "
             "rates (configs/machines/h100-80g.yaml):", "",
             "| batch | hand plan (as run) | measured s/step | predicted s/step | error | planner's own plan: "
             "predicted s/step | its plan |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['batch_tokens'] // 1024} | {c['hand_plan']} | {c['measured_step_s']:.3f} | "
                     f"{c['predicted_step_s']:.3f} | {100 * c['prediction_error']:+.1f}% | "
                     f"{c['planner_plan_predicted_step_s']:.3f} | {c['planner_plan_summary']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
