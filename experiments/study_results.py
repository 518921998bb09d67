"""The studies' results: the newest row per configuration, each system's best, speedups measured in the same
run, the printed table and the figures (matplotlib, Agg). Used by experiments/study_*.py through study_runner."""
from __future__ import annotations

from pathlib import Path


# ---- results: latest rows, ratios, plots ---------------------------------------------------------------------
def latest_rows(path: Path, experiment: str) -> list[dict]:
    """This study's rows, the newest per (system, model, batch, cap, variant, card)."""
    from lohan_jax.metrics import read_jsonl

    if not path.exists():
        return []
    latest: dict = {}
    for row in read_jsonl(path):
        if row.get("experiment") == experiment:
            key = (row.get("system"), row.get("model"), row.get("batch_tokens"), cap_of(row), row.get("variant"),
                   card_of(row))
            latest[key] = row
    return list(latest.values())


def batch_of(row: dict) -> int:
    return row.get("batch_tokens", 0) // (row.get("seq_len") or 1024)


def card_of(row: dict) -> str:
    """The GPU a row ran on, short (H100, H200): rows of different cards are never one another's latest."""
    device = row.get("device") or ""
    return next((c for c in ("H100", "H200", "A100", "RTX 4090") if c in device), device or "?")


def cap_of(row: dict) -> float:
    cap = row.get("gpu_budget_gib") or 0.0
    return 0.0 if cap > 30 else round(cap, 1)  # more than the paper's card: the whole card


def best_by_system(rows: list[dict], model: str) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for row in rows:
        if row.get("model") != model or row.get("status") != "ok" or not row.get("tokens_per_s") or row.get("variant"):
            continue
        if row["system"] not in best or row["tokens_per_s"] > best[row["system"]]["tokens_per_s"]:
            best[row["system"]] = row
    return best


def speedups(rows: list[dict], model: str, ours: str = "lohan_jax") -> dict[str, float]:
    """speedup_vs_<system>: our best tokens/s over each baseline's best, both measured in these rows."""
    best = best_by_system(rows, model)
    if ours not in best:
        return {}
    return {f"speedup_vs_{s}": best[ours]["tokens_per_s"] / r["tokens_per_s"] for s, r in best.items() if s != ours}


def table(rows: list[dict]) -> str:
    lines = [f"{'system':<24} {'model':<10} {'gpu':<5} {'batch':>5} {'cap':>5} {'status':<7} {'tok/s':>9} "
             f"{'TF(6N)':>7} {'TF(paper)':>9} {'pred s':>7} {'step s':>7}"]
    def num(r: dict, k: str, fmt: str) -> str:
        return format(r[k], fmt) if isinstance(r.get(k), (int, float)) else "-"

    order = lambda r: (r.get("model", ""), card_of(r), r.get("system", ""), cap_of(r), r.get("batch_tokens", 0))
    for r in sorted(rows, key=order):
        f = lambda k, fmt, r=r: num(r, k, fmt)
        name = (r["system"] + (":" + r["variant"] if r.get("variant") else ""))[:24]
        lines.append(f"{name:<24} {r.get('model', ''):<10} {card_of(r):<5} "
                     f"{batch_of(r):>5} {cap_of(r) or 'card':>5} {r.get('status', ''):<7} "
                     f"{f('tokens_per_s', ',.0f'):>9} {f('tflops_6n', '.0f'):>7} {f('tflops_paper', '.0f'):>9} "
                     f"{f('predicted_step_s', '.2f'):>7} {f('step_s', '.2f'):>7}")
    return "\n".join(lines)


def new_figure(n_panels: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 4.4), squeeze=False)
    fig.suptitle(title, fontsize=11)
    return fig, list(axes[0])


def mark_failures(ax, xs: list[float], labels: list[str], color: str, name: str = "") -> None:
    """Failed configurations as crosses on the x axis, labelled with their status (failures are results);
    each system's labels on their own line above the axis, so systems failing at the same x stay readable."""
    ax._failure_rows = getattr(ax, "_failure_rows", {})
    level = ax._failure_rows.setdefault(color, len(ax._failure_rows))
    for i, (x, text) in enumerate(zip(xs, labels, strict=True)):
        ax.plot([x], [0], marker="x", color=color, markersize=8, clip_on=False,
                label=f"{name}: not run / failed" if name and i == 0 else None)
        ax.annotate(text, (x, 0), textcoords="offset points", xytext=(0, 6 + 9 * level), fontsize=7, color=color,
                    ha="center")


def finish_axes(ax, ylabel: str) -> None:
    ax.set_ylabel(ylabel)
    if not any(line.get_ydata().any() for line in ax.get_lines()):
        ax.set_ylim(0, 1)
        ax.set_yticks([])
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
