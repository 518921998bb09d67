"""A run stopped after k steps and resumed from its checkpoint continues bit-identically."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lohan_jax.batches import step_batch
from lohan_jax.checkpoint import Checkpointer
from lohan_jax.config import OptimConfig
from lohan_jax.data import open_dataset
from lohan_jax.engine import OffloadEngine
from lohan_jax.models import build_model, get_spec
from lohan_jax.plan import Plan, Tier, UnitPlan, UpdateOn, uniform_plan
from lohan_jax.reference import ReferenceTrainer

STEPS, SPLIT, BATCH, SEQ = 5, 2, 4, 32
MIXED = lambda n: Plan(embed=UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU), head=UnitPlan(Tier.HOST, Tier.DISK),
                       blocks=(UnitPlan(Tier.HOST, Tier.HOST), UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU),
                               UnitPlan(Tier.HOST, Tier.DISK)))


def _make(kind, model, params, optim, tmp_path, tag):
    if kind == "reference":
        return ReferenceTrainer(model, params, optim, STEPS, model.block_module.dtype)
    return OffloadEngine(model, params, MIXED(3) if kind == "mixed" else uniform_plan(3), optim=optim,
                         total_steps=STEPS, micro_batch_shape=(BATCH, SEQ), compute_dtype=model.block_module.dtype,
                         disk_path=str(tmp_path / f"disk-{tag}"))


@pytest.mark.parametrize("kind,dtype", [("offload", jnp.float32), ("mixed", jnp.bfloat16), ("reference", jnp.float32)])
def test_resume_is_bit_identical(kind, dtype, tmp_path):
    model = build_model(get_spec("gpt-tiny", n_layers=3), dtype)
    params = model.init(jax.random.key(0), SEQ)
    optim = OptimConfig(lr=3e-3, warmup_steps=1, clip_norm=0.5)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=SEQ, batch_size=BATCH, seed=0)
    batches = [step_batch(data, s, 1) for s in range(STEPS)]

    straight = _make(kind, model, params, optim, tmp_path, "a")
    losses = [float(straight.step(b)["loss"]) for b in batches]
    final = straight.state_dict()

    first = _make(kind, model, params, optim, tmp_path, "b")
    resumed_losses = [float(first.step(b)["loss"]) for b in batches[:SPLIT]]
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(SPLIT, first, None)
    ckpt.close()  # the save is asynchronous: committed once this returns
    del first  # the "killed" run
    second = _make(kind, model, model.init(jax.random.key(9), SEQ), optim, tmp_path, "c")  # different init
    assert Checkpointer(tmp_path / "ckpt").restore(second) == SPLIT
    resumed_losses += [float(second.step(b)["loss"]) for b in batches[SPLIT:]]

    assert resumed_losses == losses
    for a, b in zip(jax.tree.leaves(second.state_dict()), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    model = build_model(get_spec("gpt-tiny", n_layers=3), jnp.float32)
    eng = OffloadEngine(model, model.init(jax.random.key(0), SEQ), uniform_plan(3), optim=OptimConfig(),
                        total_steps=2, micro_batch_shape=(BATCH, SEQ), compute_dtype=jnp.float32)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "none").restore(eng)
    other = OffloadEngine(build_model(get_spec("gpt-tiny", n_layers=2), jnp.float32),
                          build_model(get_spec("gpt-tiny", n_layers=2), jnp.float32).init(jax.random.key(0), SEQ),
                          uniform_plan(2), optim=OptimConfig(), total_steps=2, micro_batch_shape=(BATCH, SEQ),
                          compute_dtype=jnp.float32)
    two = Checkpointer(tmp_path / "two")
    two.save(1, other)
    two.close()
    with pytest.raises(ValueError, match="does not match"):
        Checkpointer(tmp_path / "two").restore(eng)


def test_cli_resume_continues_the_run_exactly(tmp_path):
    import json
    import shutil

    from lohan_jax.cli import main

    common = ["--set", "model.name=gpt-tiny", "--set", "train.steps=4", "--set", "train.seq_len=32",
              "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2", "--no-progress"]
    assert main(["train", *common, "--run-dir", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--run-dir", str(tmp_path / "b")]) == 0
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")  # as if killed after the checkpoint of step 2
    assert main(["train", "--resume", str(tmp_path / "b"), "--no-progress"]) == 0

    def losses(run):
        rows = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    a, b = losses("a"), losses("b")
    assert a == b and sorted(a) == [0, 1, 2, 3]
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_a_kill_right_after_a_checkpoint_loses_no_metrics_row(tmp_path):
    """The row of the step a checkpoint follows is written before the checkpoint commits: a resumed run starts
    after that step and would never log it again."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "lohan_jax", "train", "--no-progress", "--run-dir", str(tmp_path / "r")]
    for s in ("model.name=gpt-tiny", "model.n_layers=2", "train.steps=4", "train.seq_len=32", "train.batch_size=4",
              "train.checkpoint_every=2", "train.checkpoint_async=false", "data.eval_fraction=0"):
        argv += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(root), "LOHAN_JAX_FAULT": "backward@5:kill"}  # step 2's backward
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == [0, 1]


def test_checkpoint_at_end_false_saves_only_the_multiples(tmp_path):
    from lohan_jax.cli import main

    assert main(["train", "--set", "model.name=gpt-tiny", "--set", "train.steps=3", "--set", "train.seq_len=32",
                 "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2", "--set",
                 "train.checkpoint_at_end=false", "--no-progress", "--run-dir", str(tmp_path / "r")]) == 0
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]


def test_a_save_captures_its_step_boundary_while_training_goes_on(tmp_path):
    """Asynchronous saves (a RAM snapshot, or tasks on the host worker ahead of the next updates) hold the state
    of the step they were asked at, though the next steps update the same buffers meanwhile; so does a
    synchronous one."""
    model = build_model(get_spec("gpt-tiny", n_layers=3), jnp.float32)
    params = model.init(jax.random.key(0), SEQ)
    optim = OptimConfig(lr=3e-3, warmup_steps=1)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=SEQ, batch_size=BATCH, seed=0)
    batches = [step_batch(data, s, 1) for s in range(STEPS)]
    twin = _make("mixed", model, params, optim, tmp_path, "twin")
    for b in batches[:SPLIT]:
        twin.step(b)
    expected = [np.asarray(x) for x in jax.tree.leaves(twin.state_dict())]
    fresh = _make("mixed", model, model.init(jax.random.key(5), SEQ), optim, tmp_path, "fresh")
    for mode in ("sync", "snapshot", "worker"):
        eng = _make("mixed", model, params, optim, tmp_path, mode)
        for b in batches[:SPLIT]:
            eng.step(b)
        ckpt = Checkpointer(tmp_path / mode, async_save=mode != "sync",
                            ram_budget_bytes=0 if mode == "worker" else None)  # 0: no RAM for a snapshot
        ckpt.save(SPLIT, eng)
        for b in batches[SPLIT:]:  # updates the buffers the save is reading
            eng.step(b)
        ckpt.close()
        assert Checkpointer(tmp_path / mode).restore(fresh) == SPLIT
        for a, b in zip(jax.tree.leaves(fresh.state_dict()), expected):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=mode)
