"""Tests for lohan_jax.reference: the oracle trainer (accumulation, clipping, weight-decay mask, learning)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lohan_jax.batches import step_batch
from lohan_jax.config import OptimConfig, Schedule
from lohan_jax.data import ByteTokenizer, open_dataset
from lohan_jax.models import build_model, decay_mask, get_spec
from lohan_jax.optim.schedule import make_schedule
from lohan_jax.reference import ReferenceTrainer

SEQ_LEN = 16
SPEC = get_spec("gpt-tiny", n_layers=1)
MODEL = build_model(SPEC, jnp.float32)  # one block: half the compile time


def init_params(model, seed=0):
    """GPT-2-like fp32 init from numpy (normal(0.02) matrices, zero biases, unit scales): no XLA compile."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(a.shape, jnp.float32)
        if name == "bias":
            return jnp.zeros(a.shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.02, a.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, model.abstract_params(SEQ_LEN))


PARAMS = init_params(MODEL)


def pydoc(batch_size, seq_len=SEQ_LEN, seed=0):
    return open_dataset("builtin:pydoc", tokenizer=ByteTokenizer(), seq_len=seq_len, batch_size=batch_size,
                        seed=seed, eval_fraction=0.05)


def trainer(optim, total_steps=3, params=PARAMS, model=MODEL):
    return ReferenceTrainer(model, params, optim, total_steps, compute_dtype=jnp.float32)  # copies params


def assert_trees_close(a, b, rtol, atol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


class PartlyMasked:
    """Micro-batch m has its first 3 * m positions masked out: micro-batches hold different token counts, so
    accumulation is exact only if the loss weights are normalised over the whole step."""

    def __init__(self, source):
        self.source = source

    def batch(self, step, micro=0):
        b = dict(self.source.batch(step, micro))
        mask = b["loss_mask"].copy()
        mask[:, : 3 * micro] = 0.0
        return {**b, "loss_mask": mask}


# ---- gradient accumulation and clipping: one set of runs shared by the tests below -------------------------
def hand_written_adamw_steps(params, batches, lr, clip_norm, weight_decay, b1=0.9, b2=0.95, eps=1e-8):
    """optax.chain(clip_by_global_norm, adamw(mask)) over jax.value_and_grad of the whole batch: the contract."""
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(params)))

    def loss_fn(p, b):
        return MODEL.loss(p, b["tokens"][0], b["targets"][0], b["weights"][0])

    @jax.jit
    def step(p, state, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss, optax.tree.norm(grads)

    state, losses, norms = tx.init(params), [], []
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
        for b in batches:
            params, state, loss, norm = step(params, state, b)
            losses.append(float(loss))
            norms.append(float(norm))
    return params, losses, norms


LR, WD, CLIP = 1e-2, 0.1, 0.05


@pytest.fixture(scope="module")
def runs():
    """3 steps of the same data as 4 micro-batches of 1 and as 1 batch of 4, unclipped; clipped; by hand."""
    source = PartlyMasked(pydoc(batch_size=1))
    micro = [step_batch(source, step, 4) for step in range(3)]  # [M=4, b=1, S]
    whole = [{k: v.reshape(1, 4, SEQ_LEN) for k, v in b.items()} for b in micro]  # the same tokens, [1, 4, S]
    optim = OptimConfig(lr=LR, weight_decay=WD, schedule=Schedule.CONSTANT)
    out = {"micro": micro, "whole": whole}
    for name, batches, cfg in [("acc", micro, optim), ("one", whole, optim),
                               ("clip", whole, dataclasses.replace(optim, clip_norm=CLIP))]:
        t = trainer(cfg)
        if name == "one":
            out["eval0_whole"] = float(t.eval_loss(whole[0]))
        metrics = [t.step(b) for b in batches]
        out[name] = ([float(m["loss"]) for m in metrics], [float(m["grad_norm"]) for m in metrics],
                     t.master_params())
    out["hand"] = hand_written_adamw_steps(PARAMS, whole, lr=LR, clip_norm=CLIP, weight_decay=WD)
    return out


def test_step_batches_normalise_over_the_step(runs):
    micro = runs["micro"][0]
    assert micro["tokens"].shape == (4, 1, SEQ_LEN) and micro["tokens"].dtype == np.int32
    assert not np.array_equal(micro["tokens"][0], micro["tokens"][1])
    assert len({float(w.sum()) for w in micro["weights"]}) == 4  # micro-batches hold different token counts
    np.testing.assert_allclose(micro["weights"].sum(), 1.0, rtol=1e-6)  # the step's mean, not per micro


def test_gradient_accumulation_equals_one_batch(runs):
    acc_losses, acc_norms, acc_params = runs["acc"]
    one_losses, one_norms, one_params = runs["one"]
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
    np.testing.assert_allclose(acc_norms, one_norms, rtol=1e-5)
    assert len(set(one_losses)) == 3  # the params moved between steps
    # Adam divides by |g|, so an element whose gradient is a near-cancelling sum (the key bias's is identically
    # zero: softmax ignores a constant added to every score) gets the rounding of the summation order as a
    # relative error of its update: allow 1% of one step (lr) next to rtol 1e-5
    assert_trees_close(acc_params, one_params, rtol=1e-5, atol=1e-2 * LR)
    assert max_abs_diff(one_params, PARAMS) > 1e-3


@pytest.mark.parametrize("name", ["one", "acc"])
def test_remat_reproduces_the_step_that_keeps_activations(runs, name):
    """remat=True (blocks recomputed in the backward, as the 6B resident baseline runs) is the same step."""
    batches = runs["whole" if name == "one" else "micro"]
    t = ReferenceTrainer(MODEL, PARAMS, OptimConfig(lr=LR, weight_decay=WD, schedule=Schedule.CONSTANT), 3,
                         compute_dtype=jnp.float32, remat=True)
    metrics = [t.step(b) for b in batches]
    losses, norms, params = runs[name]
    np.testing.assert_allclose([float(m["loss"]) for m in metrics], losses, rtol=1e-6)
    np.testing.assert_allclose([float(m["grad_norm"]) for m in metrics], norms, rtol=1e-5)
    assert_trees_close(t.master_params(), params, rtol=1e-5, atol=1e-2 * LR)  # Adam on near-zero grads: as above
    assert max_abs_diff(t.master_params(), params) < max_abs_diff(params, PARAMS) / 100  # the step, not noise


def test_eval_loss_is_the_masked_mean_token_nll(runs):
    whole = runs["whole"][0]
    tokens, targets, weights = (whole[k].reshape(4, SEQ_LEN) for k in ("tokens", "targets", "weights"))
    nll = optax.softmax_cross_entropy_with_integer_labels(jax.jit(MODEL.apply)(PARAMS, tokens), targets)
    mask = weights > 0
    assert 0 < mask.sum() < mask.size
    expected = float(jnp.sum(jnp.where(mask, nll, 0.0))) / float(mask.sum())
    assert runs["eval0_whole"] == pytest.approx(expected, rel=1e-6)
    assert runs["one"][0][0] == pytest.approx(expected, rel=1e-6)  # forward-only agrees with value_and_grad


def test_clipping_matches_hand_written_optax(runs):
    clip_losses, clip_norms, clip_params = runs["clip"]
    hand_params, hand_losses, hand_norms = runs["hand"]
    assert min(hand_norms) > 10 * CLIP  # clipping really acts on every step
    # bit for bit: with one micro-batch the trainer's scan adds its gradient to zeros, which is exact
    assert clip_norms == hand_norms  # the reported norm is the unclipped one
    assert clip_losses == hand_losses
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), clip_params, hand_params)


def test_clipping_changes_the_result(runs):
    # Adam is invariant to a constant gradient scale only up to eps; clipping by different factors at
    # different steps changes the moments' mix, so clipped and unclipped runs must differ clearly
    assert max_abs_diff(runs["clip"][2], runs["one"][2]) > 1e-4
    assert runs["clip"][0][0] == runs["one"][0][0]  # the first loss is before any update


# ---- weight decay mask ---------------------------------------------------------------------------------------
def test_weight_decay_only_on_matrices():
    """With zero loss weights every gradient is zero, so AdamW's update is pure decoupled decay: matrices shrink
    by (1 - lr * wd), vectors (norms, biases) must not move at all."""
    batch = step_batch(pydoc(batch_size=2), 0, 1)
    batch = {**batch, "weights": np.zeros_like(batch["weights"])}
    params = jax.tree.map(lambda p: p + 0.5, PARAMS)  # non-zero biases, so decaying them would show
    lr, wd = 0.1, 0.5
    t = trainer(OptimConfig(lr=lr, weight_decay=wd, schedule=Schedule.CONSTANT), params=params)
    metrics = t.step(batch)
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    n_vectors = 0
    for new, old in zip(jax.tree.leaves(t.master_params()), jax.tree.leaves(params), strict=True):
        if old.ndim >= 2:
            np.testing.assert_allclose(np.asarray(new), np.asarray(old) * (1 - lr * wd), rtol=1e-6)
        else:
            n_vectors += 1
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    assert n_vectors > 0


# ---- schedule ------------------------------------------------------------------------------------------------
def test_schedules():
    cosine = make_schedule(OptimConfig(lr=1.0, min_lr_ratio=0.1), 10)
    assert float(cosine(0)) == pytest.approx(1.0) and float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(5)) == pytest.approx(0.55)  # halfway down the cosine
    warm = make_schedule(OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.0), 12)
    assert [float(warm(s)) for s in (0, 2, 4)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(warm(12)) == pytest.approx(0.0, abs=1e-7)
    const = make_schedule(OptimConfig(lr=0.3, schedule=Schedule.CONSTANT), 10)
    assert float(const(0)) == float(const(9)) == pytest.approx(0.3)


# ---- it learns -----------------------------------------------------------------------------------------------
def test_loss_decreases_on_pydoc():
    data = pydoc(batch_size=8, seq_len=32)
    model = build_model(get_spec("gpt-tiny"), jnp.float32)
    t = trainer(OptimConfig(lr=1e-2, warmup_steps=2), total_steps=20, params=init_params(model), model=model)
    metrics = [t.step(step_batch(data, step, 1)) for step in range(20)]
    losses = [float(m["loss"]) for m in metrics]
    assert losses[0] == pytest.approx(np.log(257), abs=0.1)  # uniform prediction at init
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # bytes of English: quickly below log(257)
    assert all(np.isfinite(losses))
    assert float(metrics[0]["lr"]) == 0.0 and float(metrics[2]["lr"]) == pytest.approx(1e-2)  # the warmup
