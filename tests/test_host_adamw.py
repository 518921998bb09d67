"""The fused host AdamW kernel equals optax.adamw on XLA:CPU bit for bit, rounds to bf16 like ml_dtypes/XLA."""

import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numba
import numpy as np
import optax
import pytest

from lohan_jax.optim import host_adamw

HP = dict(b1=0.9, b2=0.999, eps=1e-8)
WD = 0.1
# Tensors of one block back to back, none a multiple of the chunk, two segments straddling chunk edges;
# wd 0 marks what the mask excludes (norms, biases).
SIZES = [70_001, 257, 65_536 + 3, 129, 1]
DECAYS = [WD, 0.0, WD, 0.0, WD]


def _grads(rng, n, dtype):
    """Magnitudes from 1e-42 to 10 (denormals included: XLA:CPU flushes them, so must the kernel), signs
    mixed, some exact zeros."""
    g = rng.standard_normal(n) * 10.0 ** rng.uniform(-42, 1, n)
    g[rng.random(n) < 0.01] = 0.0
    return g.astype(np.float32).astype(dtype)


def _optax_reference(p0, grads, schedule):
    """optax.adamw on jax's CPU backend over the same tensors, jitted as a train step would be."""
    bounds, _ = host_adamw.make_segments(SIZES, DECAYS)
    split = lambda x: {f"t{k}": jnp.asarray(x[bounds[k]:bounds[k + 1]]) for k in range(len(SIZES))}
    mask = {f"t{k}": DECAYS[k] != 0.0 for k in range(len(SIZES))}
    opt = optax.adamw(schedule, weight_decay=WD, mask=mask, **HP)

    @jax.jit
    def step(g, state, params):
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    # optax's decay**count (Python float ** int32) has no promotion path under conftest's strict setting.
    with jax.default_device(jax.devices("cpu")[0]), jax.numpy_dtype_promotion("standard"):
        params = split(p0)
        state = opt.init(params)
        for g in grads:
            params, state = step(split(np.asarray(g, np.float32)), state, params)
        join = lambda t: np.concatenate([np.asarray(t[f"t{k}"]) for k in range(len(SIZES))])
        return join(params), join(state[0].mu), join(state[0].nu)


def _run_kernel(p0, grads, lr_of_count, **kw):
    bounds, decays = host_adamw.make_segments(SIZES, DECAYS)
    master, mu, nu = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    out = np.full(p0.shape, 0xFFFF, np.uint16)
    for count, g in enumerate(grads, start=1):
        host_adamw.adamw_update_(master, mu, nu, g, out, lr=lr_of_count(count), count=count, seg_bounds=bounds,
                                 seg_decay=decays, **HP, **kw)
    return master, mu, nu, out


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    host_adamw.warmup()


@pytest.mark.parametrize("grad_dtype", [np.float32, ml_dtypes.bfloat16])
def test_matches_optax_adamw_on_cpu(grad_dtype):
    rng = np.random.default_rng(0)
    n = sum(SIZES)
    p0 = rng.standard_normal(n).astype(np.float32)
    p0[:100] = 0.0  # weights at zero: the decay term must not produce NaN or -0 surprises
    grads = [_grads(rng, n, grad_dtype) for _ in range(5)]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=3, decay_steps=10, end_value=1e-3)
    # Evaluate the schedule under jit, as it is inside optax's step: eager jnp computes x / 3 where jit
    # computes x * 0.33333334, and the lr can differ by an ulp.
    jit_schedule = jax.jit(schedule)
    with jax.default_device(jax.devices("cpu")[0]):
        master, mu, nu, out = _run_kernel(p0, grads, lambda c: float(jit_schedule(c - 1)))
    ref_master, ref_mu, ref_nu = _optax_reference(p0, grads, schedule)

    for got, ref in ((master, ref_master), (mu, ref_mu), (nu, ref_nu)):
        assert np.all(np.isfinite(got))
        rel = np.abs(got - ref) / np.maximum(np.abs(ref), np.float32(1e-30))
        assert rel.max() < 1e-6
    # Stronger, and what the offloaded step's equality with the reference step rests on: the same bits.
    np.testing.assert_array_equal(master, ref_master)
    np.testing.assert_array_equal(mu, ref_mu)
    np.testing.assert_array_equal(nu, ref_nu)
    np.testing.assert_array_equal(out, master.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_every_element_moves_as_adam_says():
    """First step: mu = (1-b1) g, nu = (1-b2) g^2, update -lr (sign(g) + wd p) on decayed segments."""
    rng = np.random.default_rng(1)
    n = sum(SIZES)
    p0 = rng.uniform(1.0, 2.0, n).astype(np.float32)
    g = (rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n)).astype(np.float32)
    lr = 1e-2
    master, mu, nu, out = _run_kernel(p0, [g], lambda c: lr)
    bounds, decays = host_adamw.make_segments(SIZES, DECAYS)
    wd = np.repeat(decays, np.diff(bounds))
    np.testing.assert_allclose(mu, 0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(nu, 0.001 * g * g, rtol=1e-6)
    np.testing.assert_allclose(master - p0, -lr * (np.sign(g) + wd * p0), rtol=1e-4)
    assert np.all(out != 0xFFFF)
    np.testing.assert_array_equal(out, master.astype(ml_dtypes.bfloat16).view(np.uint16))


@numba.njit
def _round_all(x, out):
    for i in range(x.shape[0]):
        out[i] = host_adamw._round_bf16(x[i])


def _special_f32_bits():
    exact = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000,  # ties
             0x00000001, 0x00008000, 0x00018000, 0x00008001, 0x007FFFFF, 0x807FFFFF, 0x80000001,  # denormal
             0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # smallest normal, max, overflow
             0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infs
             0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FFFFFFF, 0x7F808000]  # NaNs
    random = np.random.default_rng(2).integers(0, 2**32, 200_000, dtype=np.uint64)
    return np.concatenate([np.asarray(exact, np.uint64), random]).astype(np.uint32)


def test_bf16_rounding_is_bit_identical_to_ml_dtypes_and_jax():
    x = _special_f32_bits().view(np.float32)
    got = np.empty(x.shape, np.uint16)
    _round_all(x, got)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    on_cpu = jax.device_put(x, jax.devices("cpu")[0])
    np.testing.assert_array_equal(got, np.asarray(jax.jit(lambda a: a.astype(jnp.bfloat16))(on_cpu)).view(np.uint16))


def test_kernel_output_rounds_inf_nan_and_ties():
    """lr = 0 and zero grads leave master as it is (NaN quietened): out is then master rounded."""
    bits = _special_f32_bits()
    denormal = ((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0)  # DAZ reads these weights as zero
    before = bits[~denormal].view(np.float32)
    master = before.copy()
    n = master.shape[0]
    out = np.zeros(n, ml_dtypes.bfloat16)
    host_adamw.adamw_update_(master, np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32),
                             out, lr=0.0, count=1, seg_bounds=[0, n], seg_decay=[0.0], **HP)
    nan = np.isnan(before)
    np.testing.assert_array_equal(np.isnan(master), nan)
    np.testing.assert_array_equal(master[~nan].view(np.uint32), before[~nan].view(np.uint32))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out.view(np.uint16), master.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.isinf(master).sum() >= 2 and nan.sum() >= 7


@pytest.mark.parametrize("grad_dtype", [np.float32, ml_dtypes.bfloat16])
def test_grad_scale_is_one_fp32_multiply(grad_dtype):
    rng = np.random.default_rng(3)
    n = sum(SIZES)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * 3).astype(np.float32).astype(grad_dtype) for _ in range(3)]
    scale = 0.37
    scaled = [g.astype(np.float32) * np.float32(scale) for g in grads]
    got = _run_kernel(p0, grads, lambda c: 1e-3, grad_scale=scale)
    want = _run_kernel(p0, scaled, lambda c: 1e-3)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    unit = _run_kernel(p0, grads, lambda c: 1e-3, grad_scale=1.0)
    plain = _run_kernel(p0, [g.astype(np.float32) for g in grads], lambda c: 1e-3)
    for a, b in zip(unit, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], unit[0])


@pytest.mark.parametrize("grad_dtype", [np.float32, ml_dtypes.bfloat16])
def test_accumulate_adds_in_fp32(grad_dtype):
    rng = np.random.default_rng(4)
    n = 3 * host_adamw.CHUNK_ELEMS + 5
    acc = rng.standard_normal(n).astype(np.float32)
    want = acc.copy()
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32).astype(grad_dtype)
        host_adamw.accumulate_(acc, g)
        want += g.astype(np.float32)
    np.testing.assert_array_equal(acc, want)


def test_result_does_not_depend_on_threads_and_runs_beside_another_thread():
    """Elementwise, so any thread count gives the same bits; the omp threading layer must also take a call
    from a second Python thread while the main thread runs a kernel (the optimizer thread's situation)."""
    rng = np.random.default_rng(5)
    n = sum(SIZES)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    before = host_adamw.get_num_threads()
    try:
        host_adamw.set_num_threads(1)
        one = _run_kernel(p0, grads, lambda c: 1e-3)
        host_adamw.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        box = {}
        worker = threading.Thread(target=lambda: box.update(r=_run_kernel(p0, grads, lambda c: 1e-3)))
        worker.start()
        acc = np.zeros(n, np.float32)
        for g in grads * 20:
            host_adamw.accumulate_(acc, g)
        worker.join()
    finally:
        host_adamw.set_num_threads(before)
    for a, b in zip(one, box["r"], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(acc, 20 * (grads[0] + grads[1]), rtol=1e-4, atol=1e-4)


def test_bias_correction_matches_jax():
    counts = np.arange(1, 5001, dtype=np.int32)
    for decay in (0.9, 0.999, 0.9999):
        with jax.numpy_dtype_promotion("standard"):
            on_cpu = jax.device_put(counts, jax.devices("cpu")[0])
            ref = np.asarray(jax.jit(jax.vmap(lambda c, d=decay: 1 - d**c))(on_cpu))
        got = np.array([host_adamw.bias_correction_f32(decay, int(c)) for c in counts])
        np.testing.assert_array_equal(got, ref)


def test_rejects_bad_buffers():
    n = 10
    f = lambda: np.zeros(n, np.float32)
    call = lambda master=None, grad=None, out=None, bounds=(0, n), count=1: host_adamw.adamw_update_(
        f() if master is None else master, f(), f(), f() if grad is None else grad, out, lr=1e-3, count=count,
        seg_bounds=np.asarray(bounds), seg_decay=np.zeros(len(bounds) - 1, np.float32), **HP)
    with pytest.raises(ValueError, match="master_f32"):
        call(master=np.zeros(n, np.float64))
    with pytest.raises(ValueError, match="grad"):
        call(grad=np.zeros(n + 1, np.float32))
    with pytest.raises(ValueError, match="out_bf16"):
        call(out=np.zeros(n, np.float32))
    with pytest.raises(ValueError, match="seg_bounds"):
        call(bounds=(0, 4, 3, n))
    with pytest.raises(ValueError, match="seg_bounds"):
        call(bounds=(0, n - 1))
    with pytest.raises(ValueError, match="count"):
        call(count=0)
    with pytest.raises(ValueError, match="read-only"):
        ro = f()
        ro.flags.writeable = False
        call(master=ro)
    with pytest.raises(ValueError, match="num_threads"):
        host_adamw.set_num_threads(0)
