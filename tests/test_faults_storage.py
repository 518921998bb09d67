"""Corrupted, truncated or missing checkpoint and store files, and a full disk during a store write and during
a checkpoint: each is a clear error naming the file, the previous valid checkpoint is used when one exists,
and the last good checkpoint is never touched."""
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from lohan_jax import faults
from lohan_jax.batches import step_batch
from lohan_jax.checkpoint import Checkpointer, CheckpointError
from lohan_jax.cli import main
from lohan_jax.config import OptimConfig
from lohan_jax.data import open_dataset
from lohan_jax.engine import OffloadEngine
from lohan_jax.models import build_model, get_spec
from lohan_jax.plan import Plan, Tier, UnitPlan, UpdateOn
from lohan_jax.reference import ReferenceTrainer

BATCH, SEQ, STEPS = 4, 32, 4
MIXED = Plan(embed=UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU), head=UnitPlan(Tier.HOST, Tier.DISK),
             blocks=(UnitPlan(Tier.HOST, Tier.HOST), UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU),
                     UnitPlan(Tier.HOST, Tier.DISK)))


@pytest.fixture(autouse=True)
def _disarm():
    yield
    faults.arm(None)


@pytest.fixture(scope="module")
def setup():
    model = build_model(get_spec("gpt-tiny", n_layers=3), jnp.float32)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=SEQ, batch_size=BATCH, seed=0)
    return model, model.init(jax.random.key(0), SEQ), [step_batch(data, s, 1) for s in range(STEPS)]


def _engine(setup, disk):
    model, params, _ = setup
    return OffloadEngine(model, params, MIXED, optim=OptimConfig(lr=3e-3, warmup_steps=1), total_steps=STEPS,
                         micro_batch_shape=(BATCH, SEQ), compute_dtype=jnp.float32, disk_path=str(disk))


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    """A run of STEPS steps checkpointed after each, and its losses; tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("saved")
    eng = _engine(setup, root / "disk")
    ckpt = Checkpointer(root / "ckpt", max_to_keep=STEPS)
    losses = []
    for s, b in enumerate(setup[2]):
        losses.append(float(eng.step(b)["loss"]))
        ckpt.save(s + 1, eng)
    ckpt.close()
    eng.close()
    return root / "ckpt", losses


def _copy(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "ckpt")  # (copies: the saved run's hard links stay untouched)
    return tmp_path / "ckpt"


def _chunk(ckpt, step, unit):
    files = sorted(p for p in glob.glob(str(ckpt / str(step) / "arrays" / unit / "c" / "**"), recursive=True)
                   if os.path.isfile(p))
    assert files
    return files[0]


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x5A
    open(path, "wb").write(bytes(data))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


CORRUPTIONS = {
    "flipped-byte-host-unit": lambda c: (_flip(_chunk(c, STEPS, "block0")), "block0")[1],
    "flipped-byte-disk-unit": lambda c: (_flip(_chunk(c, STEPS, "head")), "head")[1],
    "truncated-chunk": lambda c: (_truncate(_chunk(c, STEPS, "block1")), "block1")[1],
    "missing-chunk": lambda c: (os.remove(_chunk(c, STEPS, "embed")), "embed")[1],
    "missing-zarr-json": lambda c: (os.remove(c / str(STEPS) / "arrays" / "block2" / "zarr.json"), "zarr.json")[1],
    "missing-meta": lambda c: (os.remove(c / str(STEPS) / "meta" / "metadata"), "metadata")[1],
    "garbage-meta": lambda c: ((c / str(STEPS) / "meta" / "metadata").write_text("{not json"), "metadata")[1],
}


@pytest.fixture(scope="module")
def restored(setup, tmp_path_factory):
    """One engine the corruption cases restore into (a restore replaces all of its state)."""
    eng = _engine(setup, tmp_path_factory.mktemp("restored") / "disk")
    yield eng
    eng.close()


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_damaged_checkpoint_names_the_file_and_the_previous_one_is_used(corrupt, setup, saved, restored, tmp_path,
                                                                        caplog):
    ckpt_dir = _copy(saved, tmp_path)
    named = CORRUPTIONS[corrupt](ckpt_dir)
    eng = restored
    with pytest.raises(CheckpointError, match=rf"{STEPS}.*{named}"):  # asked for explicitly: an error naming it
        Checkpointer(ckpt_dir).restore(eng, step=STEPS)
    assert Checkpointer(ckpt_dir).restore(eng) == STEPS - 1  # the latest is skipped for the previous one
    assert f"checkpoint {STEPS} is unusable" in caplog.text and named in caplog.text
    # and the previous one is good: the last step replays to the loss the uninterrupted run had
    assert float(eng.step(setup[2][STEPS - 1])["loss"]) == saved[1][STEPS - 1]


def test_no_valid_checkpoint_is_an_error_listing_each(saved, restored, tmp_path):
    ckpt_dir = _copy(saved, tmp_path)
    for step in range(1, STEPS + 1):
        _flip(_chunk(ckpt_dir, step, "block0"))
    with pytest.raises(CheckpointError, match=r"no valid checkpoint.*step 4: .*block0.*step 1: .*block0"):
        Checkpointer(ckpt_dir).restore(restored)


def test_a_checkpoint_of_another_model_is_refused_not_skipped(setup, saved, tmp_path):
    model, params, _ = setup
    ref = ReferenceTrainer(model, params, OptimConfig(), STEPS, jnp.float32)  # another trainer, other arrays
    with pytest.raises(ValueError, match="does not match this model and plan"):
        Checkpointer(_copy(saved, tmp_path)).restore(ref)


def test_corrupt_store_state_during_training_is_an_error_naming_the_unit(setup, tmp_path):
    eng = _engine(setup, tmp_path / "disk")
    eng.step(setup[2][0])
    eng.worker.drain()
    for u in eng.units:
        if u.write is not None:
            u.write.result()
    chunk = sorted(p for p in glob.glob(str(tmp_path / "disk" / "block2" / "**" / "c" / "**"), recursive=True)
                   if os.path.isfile(p))[0]
    _flip(chunk)
    with pytest.raises(RuntimeError, match=r"block2.*(?i:digest|checksum|crc)"):
        eng.step(setup[2][1])
        eng.worker.drain()
    eng.close()


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(setup, tmp_path):
    eng = _engine(setup, tmp_path / "disk")
    ckpt = Checkpointer(tmp_path / "ckpt")
    eng.step(setup[2][0])
    ckpt.save(1, eng)
    ckpt.wait()
    eng.step(setup[2][1])
    faults.arm("checkpoint_write@3:enospc")  # the third array of the next checkpoint
    ckpt.save(2, eng)  # asynchronous: the failure surfaces at the next wait/save/close
    with pytest.raises(CheckpointError, match=r"No space left.*the last checkpoint \(step 1\) is intact"):
        ckpt.wait()
    assert ckpt.all_steps() == [1]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if not p.name.isdigit()]  # no temporaries left
    assert ckpt.restore(eng) == 1
    eng.close()


def test_not_enough_disk_for_a_checkpoint_is_refused_before_writing(restored, tmp_path, monkeypatch):
    import lohan_jax.checkpoint as ckpt_mod
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    with pytest.raises(CheckpointError, match=r"not enough disk for checkpoint 1 .* no earlier checkpoint exists"):
        Checkpointer(tmp_path / "ckpt").save(1, restored)
    assert not list((tmp_path / "ckpt").iterdir())


TINY = ["--set", "model.name=gpt-tiny", "--set", "model.n_layers=3", "--set", "train.steps=4", "--set",
        "train.seq_len=32", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=1", "--set",
        "data.eval_fraction=0", "--set", "offload.optim_state=disk", "--no-progress"]


@pytest.mark.parametrize("fault,named", [("disk_write@8:enospc", "No space left"),
                                         ("checkpoint_write@9:enospc", "No space left")],
                         ids=["store-write", "checkpoint-write"])
def test_full_disk_ends_the_run_with_one_line_and_the_last_checkpoint_intact(fault, named, tmp_path, capsys):
    faults.arm(fault)
    argv = ["train", *TINY, "--set", f"offload.disk_path={tmp_path / 'disk'}", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "Traceback" not in err[0], err
    faults.arm(None)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 4
    # the run continues from its last good checkpoint once there is space again
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0


def test_a_disk_path_in_use_by_another_process_is_refused(tmp_path):
    import subprocess
    import sys

    from lohan_jax.tiers.store import StateStore
    StateStore(tmp_path / "disk")
    code = ("import sys; from lohan_jax.tiers.store import StateStore, StoreError\n"
            f"try: StateStore({str(tmp_path / 'disk')!r})\n"
            "except StoreError as e: print(e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 3 and "in use by another running process" in proc.stdout, proc.stderr
    StateStore(tmp_path / "disk")  # this process may open it again (a later engine)
