"""`lohan-jax report RUN_DIR`: a run directory summarised as a short markdown page with PNG plots.

Reads what training wrote (metrics.jsonl, config.yaml, run.json, timeline-step*-summary.json) and writes
report.md with report-loss.png (train and held-out loss), report-throughput.png (tokens/s and TFLOPS per
step), report-time.png (busy time per resource in the traced step, when one was traced) and
report-traffic.png (bytes moved per step by direction and tensor class, from the traffic/* metrics).
Pure Python + matplotlib; never imports jax.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lohan_jax.metrics import read_jsonl

# traffic/<direction>[_<what>]_gb keys; the direction says between which tiers the bytes moved
DIRECTIONS = {"h2d": "host -> GPU", "d2h": "GPU -> host", "disk_read": "disk -> host", "disk_write": "host -> disk"}


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], _num(r[key])) for r in rows if key in r]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.zeros(0), np.zeros(0))


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The files of a run directory: metrics rows, config dict, run.json, and timeline summaries by step."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no metrics.jsonl")
    rows = read_jsonl(metrics)
    if not rows:
        raise ValueError(f"{metrics} is empty: the run wrote no metrics yet")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    timelines = {}
    for p in sorted(run_dir.glob("timeline-step*-summary.json")):
        m = re.fullmatch(r"timeline-step(\d+)-summary\.json", p.name)
        if m:
            timelines[int(m.group(1))] = json.loads(p.read_text())
    return {"dir": run_dir, "rows": rows, "config": config or {}, "run": run, "timelines": timelines}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: losses, held-out loss and perplexity, median throughput, traffic per step."""
    rows = run["rows"]
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r and math.isfinite(_num(r["eval/loss"]))]
    final = next((r for r in reversed(rows) if "eval/loss" in r and "train/loss" not in r), {})
    timed = [r for r in train if r["step"] > 0] or train  # step 0 includes compilation

    def median(key: str, pool=timed) -> float:
        vals = [_num(r[key]) for r in pool if key in r]
        return float(np.median(vals)) if vals else math.nan

    traffic_keys = sorted({k for r in train for k in r if k.startswith("traffic/")})
    out = {
        "steps": max((r["step"] for r in train), default=-1) + 1,
        "first_loss": _num(train[0]["train/loss"]) if train else math.nan,
        "last_loss": _num(train[-1]["train/loss"]) if train else math.nan,
        "eval_loss": _num(final.get("eval/loss", evals[-1]["eval/loss"] if evals else math.nan)),
        "best_eval": min(((_num(r["eval/loss"]), r["step"]) for r in evals), default=(math.nan, -1)),
        "tokens_per_s": _num(final.get("perf/tokens_per_s", median("perf/tokens_per_s"))),
        "tflops": _num(final.get("perf/tflops", median("perf/tflops"))),
        "mfu": _num(final.get("perf/mfu", median("perf/mfu"))),
        "step_s": _num(final.get("perf/step_s", median("perf/step_s"))),
        "traffic_gb_per_step": {k.removeprefix("traffic/").removesuffix("_gb"): median(k) for k in traffic_keys},
        "wall_s": rows[-1]["time"] - rows[0]["time"] if "time" in rows[0] else math.nan,
    }
    out["eval_ppl"] = math.exp(min(out["eval_loss"], 700.0))  # nan stays nan
    return out


# ---- plots -------------------------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_loss(rows: list[dict], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(*_series([r for r in rows if "train/loss" in r], "train/loss"), label="train", lw=1)
    steps, loss = _series([r for r in rows if "eval/loss" in r], "eval/loss")
    if len(steps):
        ax.plot(steps, loss, "o-", label="held-out", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_throughput(rows: list[dict], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    train = [r for r in rows if "train/loss" in r]
    ax.plot(*_series(train, "perf/tokens_per_s"), color="C0", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s", color="C0")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(*_series(train, "perf/tflops"), color="C1", lw=1)
    right.set_ylabel("TFLOPS (6N)", color="C1")
    fig.tight_layout()
    fig.savefig(path)


def plot_time(summary: dict[str, Any], step: int, path: Path) -> None:
    lanes = summary.get("lanes", {})
    fig = _figure(height=0.6 + 0.45 * max(len(lanes), 1))
    ax = fig.add_subplot()
    names = list(lanes)
    ax.barh(names[::-1], [lanes[n]["busy_s"] * 1e3 for n in names[::-1]], color="C2")
    ax.axvline(summary.get("total_s", 0) * 1e3, color="k", ls="--", lw=1, label="step wall time")
    ax.set_xlabel("busy time (ms)")
    ax.set_title(f"time by resource, step {step}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_traffic(rows: list[dict], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    train = [r for r in rows if "train/loss" in r]
    for direction, label in DIRECTIONS.items():
        steps, gb = _series(train, f"traffic/{direction}_gb")
        if len(steps):
            ax.plot(steps, gb, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("GB per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# ---- the page ----------------------------------------------------------------------------------------------------
def _fmt(v: float, spec: str = ".4g") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Writes report.md and its PNGs into out_dir (default: the run directory); returns report.md's path."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run["dir"]
    out.mkdir(parents=True, exist_ok=True)
    s, rows, cfg, info = summarize(run), run["rows"], run["config"], run["run"]
    model, train = cfg.get("model", {}), cfg.get("train", {})
    tokens = train.get("batch_size", 0) * train.get("seq_len", 0)
    lines = [f"# Run report: {run['dir'].name}", "", "| | |", "|---|---|",
             f"| model | {model.get('name', '?')} ({model.get('arch', '?')}, "
             f"{_count(info.get('params', 0))} parameters)"
             + (f", from {cfg['hf']['checkpoint']}" if cfg.get("hf", {}).get("checkpoint") else "") + " |",
             f"| device | {info.get('device', '?')} ({info.get('backend', '?')}, jax {info.get('jax_version', '?')}) |",
             f"| steps | {s['steps']} x {train.get('batch_size', '?')} sequences x {train.get('seq_len', '?')} tokens "
             f"= {tokens} tokens/step, engine {train.get('engine', '?')} |",
             f"| train loss | {_fmt(s['first_loss'], '.4f')} -> {_fmt(s['last_loss'], '.4f')} |",
             f"| held-out loss | {_fmt(s['eval_loss'], '.4f')} (perplexity {_fmt(s['eval_ppl'], '.4g')}); best "
             f"{_fmt(s['best_eval'][0], '.4f')} at step {s['best_eval'][1]} |",
             f"| throughput | {_fmt(s['tokens_per_s'], ',.0f')} tokens/s, {_fmt(s['tflops'], '.3g')} TFLOPS (6N)"
             f", MFU {_fmt(s['mfu'] * 100, '.1f')}{'%' if math.isfinite(s['mfu']) else ''}, "
             f"{_fmt(s['step_s'], '.3g')} s/step (medians) |",
             f"| wall time | {_fmt(s['wall_s'], '.0f')} s from first to last metrics row |", ""]
    if cfg.get("hf", {}).get("export_dir"):
        lines += [f"Fine-tuned weights exported to `{cfg['hf']['export_dir']}` (Hugging Face layout).", ""]
    plot_loss(rows, out / "report-loss.png")
    plot_throughput(rows, out / "report-throughput.png")
    lines += ["![loss](report-loss.png)", "", "![throughput](report-throughput.png)", ""]
    if run["timelines"]:
        step = max(run["timelines"])
        summary = run["timelines"][step]
        plot_time(summary, step, out / "report-time.png")
        lines += [f"## Time by resource (traced step {step}, {summary.get('total_s', 0) * 1e3:.1f} ms)", "",
                  "| resource | busy ms | share of the step |", "|---|---:|---:|"]
        lines += [f"| {lane} | {v['busy_s'] * 1e3:.1f} | {v['busy_fraction'] * 100:.0f}% |"
                  for lane, v in summary.get("lanes", {}).items()]
        lines += ["", "![time](report-time.png)", ""]
    if s["traffic_gb_per_step"]:
        plot_traffic(rows, out / "report-traffic.png")
        lines += ["## Bytes moved per step (median)", "", "| traffic | GB per step | GB over the run |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {v:.4g} | {v * max(s['steps'], 0):.4g} |" for k, v in s["traffic_gb_per_step"].items()]
        lines += ["", "![traffic](report-traffic.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="summarise a run directory as report.md with loss, throughput, time and "
                                      "traffic plots")
    p.add_argument("run_dir", help="a directory written by `lohan-jax train`")
    p.add_argument("--out", help="write the report here instead of into the run directory")
    p.set_defaults(func=lambda args: print(write_report(args.run_dir, args.out)) or 0)
