"""A step with a non-finite loss or gradient norm applies none of its updates, in the offloaded engine exactly
as in the reference trainer: weights, Adam moments, the disk store and Adam's step count stay as they were;
the step and the first offending unit are reported. A fast-path step torn by a non-finite gradient is
replayed from the last checkpoint and skipped exactly; under train.on_nonfinite=stop the run ends."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lohan_jax import faults
from lohan_jax.batches import step_batch
from lohan_jax.cli import main
from lohan_jax.config import OptimConfig, load_config
from lohan_jax.data import open_dataset
from lohan_jax.engine import OffloadEngine
from lohan_jax.models import build_model, get_spec
from lohan_jax.plan import Plan, Tier, UnitPlan, UpdateOn
from lohan_jax.reference import ReferenceTrainer

STEPS, BAD, BATCH, SEQ = 4, 2, 4, 32
MIXED = Plan(embed=UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU), head=UnitPlan(Tier.HOST, Tier.DISK),
             blocks=(UnitPlan(Tier.HOST, Tier.HOST), UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU),
                     UnitPlan(Tier.HOST, Tier.DISK)))


def _setup(clip=0.0):
    model = build_model(get_spec("gpt-tiny", n_layers=3), jnp.float32)
    params = model.init(jax.random.key(0), SEQ)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=SEQ, batch_size=BATCH, seed=0)
    return model, params, OptimConfig(lr=3e-3, warmup_steps=1, clip_norm=clip), [
        step_batch(data, s, 1) for s in range(STEPS)]


class _PoisonedBwd:
    """Block program wrapper: the weight gradient of the armed call is NaN (the loss stays finite)."""

    def __init__(self, program):
        self.program, self.armed = program, False

    def __getattr__(self, name):
        return getattr(self.program, name)

    def bwd(self, *args):
        dx, dw, sq = self.program.bwd(*args)
        if self.armed:
            return dx, dw * jnp.nan, sq * jnp.nan
        return dx, dw, sq


def _poison_block1(grads, call):
    bad = call == BAD
    blocks = list(grads["blocks"])
    blocks[1] = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), blocks[1])
    return {**grads, "blocks": blocks}


def _state(trainer):
    return [np.asarray(x).copy() for x in jax.tree.leaves(trainer.state_dict())]


@pytest.mark.parametrize("fault,clip", [("loss", 0.0), ("grad", 0.5)], ids=["loss-fast-path", "grad-deferred"])
def test_nonfinite_step_is_skipped_like_the_reference(fault, clip, tmp_path):
    model, params, optim, batches = _setup(clip)
    if fault == "loss":  # an inf loss weight: loss and every gradient non-finite
        w = batches[BAD]["weights"].copy()
        w[0, 0, 3] = np.inf
        batches[BAD] = {**batches[BAD], "weights": w}
    ref = ReferenceTrainer(model, params, optim, STEPS, jnp.float32,
                           grad_fault=_poison_block1 if fault == "grad" else None)
    eng = OffloadEngine(model, params, MIXED, optim=optim, total_steps=STEPS, micro_batch_shape=(BATCH, SEQ),
                        compute_dtype=jnp.float32, disk_path=str(tmp_path / "disk"))
    probe = eng.block_programs[1] = _PoisonedBwd(eng.block_programs[1])
    results = {}
    for name, trainer in (("ref", ref), ("eng", eng)):
        losses, verdicts = [], []
        for s, b in enumerate(batches):
            if s == BAD:
                before = _state(trainer)
            probe.armed = fault == "grad" and name == "eng" and s == BAD
            out = trainer.step(b)
            losses.append(float(out["loss"]))
            verdicts.append((out["nonfinite"].skipped, out["nonfinite"].unit))
            if s == BAD:  # nothing of the poisoned step was written: state (incl. the disk store) bit-identical
                for a, b_ in zip(_state(trainer), before):
                    np.testing.assert_array_equal(a, b_)
        results[name] = losses, verdicts, trainer.master_params(), int(np.asarray(trainer.state_dict()["step"])[0])
    (ref_l, ref_v, ref_p, ref_n), (eng_l, eng_v, eng_p, eng_n) = results["ref"], results["eng"]
    unit = "loss" if fault == "loss" else "block1"
    assert ref_v == eng_v == [(False, None)] * BAD + [(True, unit)] + [(False, None)] * (STEPS - BAD - 1)
    assert ref_n == eng_n == STEPS - 1  # Adam's step count did not advance for the skipped step
    assert not np.isfinite(ref_l[BAD]) or fault == "grad"
    np.testing.assert_allclose(np.asarray(eng_l)[np.isfinite(ref_l)], np.asarray(ref_l)[np.isfinite(ref_l)], rtol=2e-4)
    for a, b in zip(jax.tree.leaves(eng_p), jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)
    eng.close()


# ---- the training loop -----------------------------------------------------------------------------------
OVERRIDES = ["model.name=gpt-tiny", f"train.steps={STEPS + 2}", f"train.seq_len={SEQ}", f"train.batch_size={BATCH}",
             "data.eval_fraction=0", "optim.lr=3e-3", "optim.warmup_steps=1"]
TINY = [a for o in OVERRIDES for a in ("--set", o)] + ["--no-progress"]


def _poison_run(monkeypatch, kind: str, bad_step: int):
    """Make step `bad_step` of every trainer the loop builds poisoned, deterministically (a replay sees it
    again): kind=loss through its batch, kind=grad through block 1's weight gradient."""
    import lohan_jax.train as train_mod

    real_batch, real_make = train_mod.step_batch, train_mod.make_trainer

    def batch(data, step, n_micro):
        b = real_batch(data, step, n_micro)
        if kind == "loss" and step == bad_step:
            b = {**b, "weights": np.where(np.arange(b["weights"].size).reshape(b["weights"].shape) == 5, np.inf,
                                          b["weights"]).astype(np.float32)}
        if kind == "grad":
            b["_step"] = step
        return b

    def make(cfg, model, params32, dtype):
        trainer = real_make(cfg, model, params32, dtype)
        if kind == "grad" and hasattr(trainer, "block_programs"):
            probe = trainer.block_programs[1] = _PoisonedBwd(trainer.block_programs[1])
            step = trainer.step

            def stepped(b):
                probe.armed = b.pop("_step") == bad_step
                return step(b)
            trainer.step = stepped
        elif kind == "grad":
            import lohan_jax.reference as ref_mod
            trainer = ref_mod.ReferenceTrainer(model, params32, cfg.optim, cfg.train.steps, dtype,
                                               grad_fault=_poison_block1_at(bad_step))
            step = trainer.step
            trainer.step = lambda b: step({k: v for k, v in b.items() if k != "_step"})
        return trainer

    monkeypatch.setattr(train_mod, "step_batch", batch)
    monkeypatch.setattr(train_mod, "make_trainer", make)


def _poison_block1_at(step):
    def fault(grads, call):
        blocks = list(grads["blocks"])
        blocks[1] = jax.tree.map(lambda g: jnp.where(call == step, jnp.nan, g), blocks[1])
        return {**grads, "blocks": blocks}
    return fault


def _run(tmp_path, name, *extra):
    from lohan_jax.train import run_training
    return run_training(load_config(None, OVERRIDES + list(extra)), run_dir=tmp_path / name, progress=False,
                        keep_params=True)


def test_torn_step_is_replayed_from_the_checkpoint_and_skipped(tmp_path, monkeypatch):
    _poison_run(monkeypatch, "grad", 3)
    eng = _run(tmp_path, "eng", "train.checkpoint_every=2")
    ref = _run(tmp_path, "ref", "train.engine=reference")
    assert eng.skipped_steps == ref.skipped_steps == [3]
    np.testing.assert_allclose(eng.losses, ref.losses, rtol=2e-4)
    for a, b in zip(jax.tree.leaves(eng.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)


def test_torn_step_without_a_checkpoint_stops_the_run(tmp_path, monkeypatch):
    _poison_run(monkeypatch, "grad", 2)
    with pytest.raises(faults.NonFiniteError, match=r"step 2: .*block1.*no checkpoint to replay"):
        _run(tmp_path, "eng")


def test_stop_policy_ends_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    _poison_run(monkeypatch, "loss", 2)
    argv = ["train", *TINY, "--set", "train.on_nonfinite=stop", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 2: non-finite loss" in err[0] and "stop" in err[0], err
    rows = [r for r in __import__("lohan_jax.metrics", fromlist=["read_jsonl"]).read_jsonl(
        tmp_path / "run" / "metrics.jsonl") if "train/skipped" in r]
    assert [(r["step"], r["train/nonfinite_unit"]) for r in rows] == [(2, "loss")]
