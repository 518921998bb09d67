"""Tests of `lohan-jax report`: a run directory becomes report.md with loss, throughput, time and traffic plots."""
import json

import numpy as np
import pytest
import yaml

from lohan_jax.cli import main
from lohan_jax.metrics import MetricsWriter
from lohan_jax.report import load_run, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir, steps=20, timeline=True, traffic=True):
    """A run directory as train.run_training writes one: metrics rows, config.yaml, run.json, a timeline."""
    run_dir.mkdir()
    with MetricsWriter(run_dir / "metrics.jsonl", stdout=False) as w:
        for s in range(steps):
            row = {"train/loss": 5.0 - 0.1 * s, "train/lr": 1e-3, "perf/step_s": 0.5 if s else 9.0,
                   "perf/tokens_per_s": 2048.0 if s else 100.0, "perf/tflops": 1.5, "perf/mfu": 0.25}
            if traffic:
                row.update({"traffic/h2d_gb": 2.0, "traffic/h2d_weights_gb": 2.0, "traffic/d2h_gb": 1.0,
                            "traffic/d2h_grad_gb": 1.0})
            w.write(s, row)
            if s % 5 == 4:
                loss = 5.2 - 0.1 * s
                w.write(s, {"eval/loss": loss, "eval/ppl": float(np.exp(loss))})
        w.write(steps, {"eval/loss": 3.25, "eval/ppl": float(np.exp(3.25)), "perf/tokens_per_s": 2048.0,
                        "perf/tflops": 1.5, "perf/mfu": 0.25, "perf/step_s": 0.5})
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": "llama-tiny", "arch": "llama"}, "train": {"batch_size": 4, "seq_len": 512,
                                                                    "engine": "offload"},
        "hf": {"checkpoint": "/ckpt/llama", "export_dir": "/out/llama-ft"}}))
    (run_dir / "run.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "backend": "gpu",
                                                  "jax_version": "0.11.2", "params": 1_100_000_000}))
    if timeline:
        (run_dir / "timeline-step3-summary.json").write_text(json.dumps({
            "total_s": 0.5, "overlap_s": {},
            "lanes": {"gpu": {"busy_s": 0.3, "busy_fraction": 0.6, "n_events": 10, "first_s": 0, "last_s": 0.5},
                      "cpu_optim": {"busy_s": 0.4, "busy_fraction": 0.8, "n_events": 5, "first_s": 0, "last_s": 0.5}}}))
    return run_dir


def test_summary_numbers(tmp_path):
    s = summarize(load_run(fake_run(tmp_path / "run")))
    assert s["steps"] == 20 and s["first_loss"] == 5.0 and s["last_loss"] == pytest.approx(3.1)
    assert s["eval_loss"] == 3.25 and s["eval_ppl"] == pytest.approx(np.exp(3.25))
    assert s["best_eval"] == (pytest.approx(3.25), 20)
    assert s["tokens_per_s"] == 2048.0 and s["mfu"] == 0.25
    assert s["traffic_gb_per_step"] == {"d2h": 1.0, "d2h_grad": 1.0, "h2d": 2.0, "h2d_weights": 2.0}


def test_report_page_and_plots(tmp_path):
    path = write_report(fake_run(tmp_path / "run"))
    text = path.read_text()
    for needle in ("llama-tiny", "1.1B parameters", "/ckpt/llama", "NVIDIA H100", "5.0000 -> 3.1000",
                   "3.2500 (perplexity 25.79)", "2,048 tokens/s", "MFU 25.0%", "## Time by resource (traced step 3",
                   "| cpu_optim | 400.0 | 80% |", "| h2d | 2 | 40 |", "/out/llama-ft"):
        assert needle in text, needle
    for png in ("loss", "throughput", "time", "traffic"):
        assert (tmp_path / "run" / f"report-{png}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"report-{png}.png" in text


def test_report_without_timeline_or_traffic(tmp_path):
    """A reference-engine run: no timeline, no traffic; those sections are left out, not faked."""
    out = tmp_path / "elsewhere"
    text = write_report(fake_run(tmp_path / "run", timeline=False, traffic=False), out).read_text()
    assert "Time by resource" not in text and "Bytes moved" not in text
    assert (out / "report-loss.png").is_file() and not (out / "report-time.png").exists()


def test_report_errors_and_cli(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a run directory: it has no metrics.jsonl"):
        write_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["report", str(fake_run(tmp_path / "run"))]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
