"""Bad configs and command lines, fuzzed: unknown keys, wrong types, impossible sizes, unreadable paths. Every
case ends with exit status 2 and one line `lohan-jax train: error: ...` naming the culprit, never a traceback,
and before anything heavy runs (these cases take milliseconds to a second each)."""
import dataclasses
import enum
import os
import random
import typing

import pytest

from lohan_jax.cli import main
from lohan_jax.config import Config

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
TINY = ["--set", "model.name=gpt-tiny", "--set", "train.steps=2", "--set", "train.seq_len=32", "--set",
        "train.batch_size=4", "--set", "data.eval_fraction=0", "--no-progress"]


def _fields():
    """(section.key, annotation) of every config field."""
    out = []
    for section in ("train", "optim", "data", "offload", "hf", "model"):
        cls = typing.get_type_hints(Config)[section]
        hints = typing.get_type_hints(cls)
        out += [(f"{section}.{f.name}", hints[f.name]) for f in dataclasses.fields(cls) if f.name != "name"]
    return out


def _wrong_values(typ) -> list[str]:
    """YAML spellings of values of the wrong type for a field annotated `typ`."""
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return ["bogus", "3", "[a]"]
    if typ is bool:
        return ["2", "maybe", "[1]", "{a: 1}"]
    if typ is int:
        return ["abc", "1.5", "[1]", "{a: 1}", "true", "null"]
    if typ is float:
        return ["fast", "[1.0]", "{a: 1}", "true", "null"]
    if typ is str:
        return ["5", "[1]", "{a: 1}", "null", "true"]
    return ["[[[", "{a: 1}"]


FIELDS = _fields()
rng = random.Random(8)
TYPE_CASES = [(key, value) for key, typ in FIELDS for value in rng.sample(_wrong_values(typ), 2)]


def _run(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("lohan-jax train: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("key,value", TYPE_CASES, ids=[f"{k}={v}" for k, v in TYPE_CASES])
def test_wrong_types_name_the_key(key, value, capsys, tmp_path):
    line = _run(["train", *TINY, "--set", f"{key}={value}", "--run-dir", str(tmp_path / "run")], capsys)
    assert key in line
    assert not (tmp_path / "run").exists()


UNKNOWN = [f"{s}.{k}" for s, k in [("train", "step"), ("train", "lr"), ("optim", "learning_rate"), ("data", "sorce"),
                                    ("offload", "disk"), ("hf", "export"), ("model", "layers"), ("model", "nlayers")]]
UNKNOWN += ["trainn.steps=1", "opt.lr=1", "x=1"]


@pytest.mark.parametrize("item", UNKNOWN)
def test_unknown_keys_suggest_the_known_one(item, capsys, tmp_path):
    item = item if "=" in item else f"{item}=1"
    line = _run(["train", *TINY, "--set", item, "--run-dir", str(tmp_path / "run")], capsys)
    sections = ("train", "optim", "data", "offload", "hf", "model")
    bad = next(k for k in item.split("=")[0].split(".") if k not in sections)
    assert "unknown config key" in line and bad in line
    assert "did you mean" in line or "known keys" in line


IMPOSSIBLE = {
    "train.steps=0": "train.steps", "train.batch_size=-4": "train.batch_size", "train.seq_len=0": "train.seq_len",
    "train.micro_batches=3": "train.micro_batches", "train.seq_len=100000": "max_seq_len",
    "train.keep_checkpoints=0": "train.keep_checkpoints", "train.checkpoint_every=-1": "train.checkpoint_every",
    "model.n_layers=0": "model.n_layers", "model.d_model=30": "model.n_heads", "model.vocab_size=-1": "vocab_size",
    "optim.lr=0": "optim.lr", "optim.b1=1.5": "optim.b1", "optim.eps=-1e-8": "optim.eps",
    "data.eval_fraction=1.0": "data.eval_fraction", "offload.prefetch_depth=0": "offload.prefetch_depth",
    "offload.activations=sometimes": "offload.activations", "offload.host_budget_gib=-2": "offload.host_budget_gib",
    "offload.optim_state=disk": "offload.disk_path", "model.vocab_size=100": "vocab",
}


@pytest.mark.parametrize("item", IMPOSSIBLE, ids=list(IMPOSSIBLE))
def test_impossible_sizes(item, capsys, tmp_path):
    line = _run(["train", *TINY, "--set", item, "--run-dir", str(tmp_path / "run")], capsys)
    assert IMPOSSIBLE[item] in line


def test_a_model_too_large_for_this_machine_is_refused_with_numbers(capsys, tmp_path):
    code = main(["train", "--set", "model.name=paper-412b", "--set", "train.seq_len=32", "--set",
                 "train.batch_size=1", "--set", "data.eval_fraction=0", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("lohan-jax train: error: the plan does not fit this machine") and "GiB" in err


def _paths(tmp):
    (tmp / "a_dir").mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "latin1.yaml").write_bytes("train:\n  steps: caf\xe9\n".encode("latin-1"))
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "bad_plan.json").write_text("{not json")
    (tmp / "run_ok").mkdir()
    return {
        "config-is-a-directory": ([str(tmp / "a_dir")], "a_dir"),
        "config-not-utf8": ([str(tmp / "latin1.yaml")], "latin1.yaml"),
        "config-is-a-list": ([str(tmp / "list.yaml")], "list.yaml"),
        "config-missing": ([str(tmp / "nope.yaml")], "nope.yaml"),
        "plan-file-missing": (["--set", f"offload.plan_file={tmp / 'nope.json'}"], "offload.plan_file"),
        "plan-file-garbage": (["--set", f"offload.plan_file={tmp / 'bad_plan.json'}"], "offload.plan_file"),
        "plan-file-a-directory": (["--set", f"offload.plan_file={tmp / 'a_dir'}"], "offload.plan_file"),
        "disk-path-a-file": (["--set", "offload.optim_state=disk", "--set", f"offload.disk_path={tmp / 'a_file'}"],
                             "offload.disk_path"),
        "disk-path-under-a-file": (["--set", "offload.optim_state=disk", "--set",
                                    f"offload.disk_path={tmp / 'a_file' / 'x'}"], "offload.disk_path"),
        "run-dir-a-file": (["--run-dir", str(tmp / "a_file")], "a_file"),
        "run-dir-under-a-file": (["--run-dir", str(tmp / "a_file" / "run")], "a_file"),
        "data-missing": (["--set", f"data.source={tmp / 'nope.txt'}"], "nope.txt"),
        "tokenizer-missing": (["--set", f"data.tokenizer={tmp / 'tok.json'}"], "data.tokenizer"),
        "hf-checkpoint-missing": (["--set", f"hf.checkpoint={tmp / 'no_model'}"], "no_model"),
        "resume-missing": (["--resume", str(tmp / "no_run")], "no_run"),
        "resume-not-a-run": (["--resume", str(tmp / "run_ok")], "config.yaml"),
    }


PATH_CASES = ["config-is-a-directory", "config-not-utf8", "config-is-a-list", "config-missing", "plan-file-missing",
              "plan-file-garbage", "plan-file-a-directory", "disk-path-a-file", "disk-path-under-a-file",
              "run-dir-a-file", "run-dir-under-a-file", "data-missing", "tokenizer-missing", "hf-checkpoint-missing",
              "resume-missing", "resume-not-a-run"]


@pytest.mark.parametrize("case", PATH_CASES)
def test_unreadable_paths(case, capsys, tmp_path):
    extra, named = _paths(tmp_path)[case]
    resume = extra[:1] == ["--resume"]
    argv = ["train", *extra, "--no-progress"] if resume or not extra[0].startswith("-") else []
    if not argv:
        argv = ["train", *TINY, *extra]
        if "--run-dir" not in extra:
            argv += ["--run-dir", str(tmp_path / "run")]
    elif not resume:
        argv = ["train", extra[0], *TINY, "--run-dir", str(tmp_path / "run")]
    line = _run(argv, capsys)
    assert named in line


MALFORMED = ["noequals", "=3", "train.=3", ".steps=3", "train..steps=3", "train=3", "train.steps.x=1",
             "train.steps=[", "train.steps={", "optim.lr=1e-3e", "train.steps=0x", "model={a: 1}"]


@pytest.mark.parametrize("item", MALFORMED)
def test_malformed_overrides(item, capsys, tmp_path):
    _run(["train", *TINY, "--set", item, "--run-dir", str(tmp_path / "run")], capsys)


def test_random_combinations(capsys, tmp_path):
    """Many random bad overrides at once: the first problem found is reported, in one line, exit 2."""
    r = random.Random(int(os.environ.get("LOHAN_JAX_FUZZ_SEED", "0")))
    for i in range(60):
        items = []
        for key, typ in r.sample(FIELDS, r.randint(1, 4)):
            items += ["--set", f"{key}={r.choice(_wrong_values(typ))}"]
        items += ["--set", r.choice(list(IMPOSSIBLE) + [u if "=" in u else f"{u}=1" for u in UNKNOWN])]
        r.shuffle(pairs := [items[j:j + 2] for j in range(0, len(items), 2)])
        _run(["train", *TINY, *[a for p in pairs for a in p], "--run-dir", str(tmp_path / f"run{i}")], capsys)
