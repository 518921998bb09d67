"""Tests for the `lohan-jax` command line, run in-process through lohan_jax.cli.main."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lohan_jax.cli import main
from lohan_jax.config import EngineKind, load_config

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
TINY_RUN = ["--set", "model.name=gpt-tiny", "--set", "train.steps=3", "--set", "train.seq_len=32",
            "--set", "train.batch_size=4", "--no-progress"]
REFERENCE = ["--set", "train.engine=reference"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_train_tiny_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY_RUN, *REFERENCE, "--set", "optim.lr=3e-3", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert "done: 3 steps" in out.out and str(run_dir) in out.out

    saved = load_config(run_dir / "config.yaml")  # the resolved config, loadable as a config file
    assert saved.model.name == "gpt-tiny" and saved.train.steps == 3 and saved.train.seq_len == 32
    assert saved.train.engine is EngineKind.REFERENCE and saved.optim.lr == 3e-3
    assert saved.train.compute_dtype == "float32"  # "auto" resolved (CPU)

    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [0, 1, 2]
    for r in train_rows:
        assert 0 < r["train/loss"] < 10 and r["perf/tokens_per_s"] > 0 and r["perf/tflops"] > 0
        assert r["train/grad_norm"] > 0 and r["train/lr"] > 0
    summary = rows[-1]
    assert summary["step"] == 3 and summary["perf/tokens_per_s"] > 0 and summary["eval/loss"] > 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["params"] == saved.model.param_count() and run["backend"] == "cpu"


def test_train_without_held_out_data(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", *TINY_RUN, *REFERENCE, "--set", "train.steps=1", "--set", "data.eval_fraction=0",
            "--run-dir", str(run_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]  # the step and the summary


def _bad_data_dir(tmp_path: Path) -> str:
    empty = tmp_path / "no_text_here"
    empty.mkdir()
    return str(empty)


def _not_utf8(tmp_path: Path) -> str:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return str(path)


@pytest.mark.parametrize("make_args, names", [
    (lambda tmp: ["--set", "train.setps=3"], ["train.setps", "did you mean train.steps"]),
    (lambda tmp: ["--set", "train.engine=gpu"], ["train.engine", "'gpu'"]),
    (lambda tmp: ["--set", "optim.lr=fast"], ["optim.lr", "float"]),
    (lambda tmp: ["--set", "model.name=gpt-tiy"], ["gpt-tiy", "did you mean gpt-tiny"]),
    (lambda tmp: ["--set", "train.seq_len=512"], ["train.seq_len=512", "max_seq_len"]),
    (lambda tmp: [str(tmp / "missing.yaml")], ["missing.yaml", "does not exist"]),
    (lambda tmp: ["--set", f"data.source={tmp / 'missing.txt'}"], ["missing.txt", "does not exist"]),
    (lambda tmp: ["--set", f"data.source={_bad_data_dir(tmp)}"], ["no_text_here", "no .txt files"]),
    (lambda tmp: ["--set", f"data.source={_not_utf8(tmp)}"], ["latin1.txt", "not valid UTF-8"]),
    (lambda tmp: ["--set", "data.source=builtin:wikipedia"], ["wikipedia", "pydoc"]),
], ids=["unknown-key", "bad-enum", "bad-type", "model-typo", "seq-too-long", "missing-config", "missing-data",
        "data-dir-without-text", "data-not-utf8", "unknown-corpus"])
def test_train_bad_inputs_exit_2_with_one_line(tmp_path, capsys, make_args, names):
    run_dir = tmp_path / "run"
    # the bad value comes last, so it overrides the tiny-run settings before it
    argv = ["train", "--set", "model.name=gpt-tiny", *REFERENCE, *make_args(tmp_path), "--run-dir", str(run_dir),
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lohan-jax train: error: ")
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0]
    assert not run_dir.exists()  # nothing written for a run that never started


def test_train_invalid_yaml_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    assert main(["train", str(path), *REFERENCE]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "not valid YAML" in err and "Traceback" not in err


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["paper-13b"][1:5] == ["gpt", "40", "5120", "40"]
    assert rows["paper-13b"][5] == "12.848B"
    assert {"gpt-tiny", "llama-tiny", "llama3-8b", "paper-412b"} <= rows.keys()


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_console_script_entry_point():
    """`python -m lohan_jax` is the same command (the `lohan-jax` script points at the same main)."""
    proc = subprocess.run([sys.executable, "-m", "lohan_jax", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "paper-13b" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("lohan_jax.engine") is None, reason="lohan_jax.engine not written yet")
def test_train_with_the_default_offload_engine(tmp_path):
    pytest.importorskip("lohan_jax.engine")
    run_dir = tmp_path / "offload"
    assert main(["train", *TINY_RUN, "--run-dir", str(run_dir)]) == 0  # no engine override: the default
    assert load_config(run_dir / "config.yaml").train.engine is EngineKind.OFFLOAD
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["perf/tokens_per_s"] > 0 for r in rows)
