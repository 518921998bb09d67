"""The offloaded engine reproduces the reference trainer (value_and_grad + optax.adamw) for every placement,
optimizer location, activation policy, micro-batching and clipping; and counts the traffic its plan implies."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lohan_jax.batches import step_batch
from lohan_jax.config import OptimConfig
from lohan_jax.data import open_dataset
from lohan_jax.engine import OffloadEngine
from lohan_jax.models import build_model, get_spec
from lohan_jax.plan import ActivationPolicy, Plan, Tier, UnitPlan, UpdateOn, uniform_plan
from lohan_jax.reference import ReferenceTrainer

STEPS, BATCH, SEQ = 3, 4, 32
HOST = UnitPlan(Tier.HOST, Tier.HOST, UpdateOn.CPU)
HBM_CPU = UnitPlan(Tier.HBM, Tier.HOST, UpdateOn.CPU)
GPU = UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU)


def _with(u: UnitPlan, act: str) -> UnitPlan:
    return dataclasses.replace(u, activations=ActivationPolicy.parse(act))


def _run(engine_or_ref, batches):
    losses = [float(engine_or_ref.step(b)["loss"]) for b in batches]
    return losses, engine_or_ref.master_params()


def _compare(model_name, plan_fn, n_micro=1, clip=0.0, dtype=jnp.float32, n_layers=3, disk_path=None, rerun=None):
    """rerun(engine, start_state, batches, (losses, params)): more checks on the same engine (compiled once)."""
    spec = get_spec(model_name, n_layers=n_layers)
    model = build_model(spec, dtype)
    optim = OptimConfig(lr=3e-3, weight_decay=0.1, clip_norm=clip, warmup_steps=1)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=SEQ, batch_size=BATCH // n_micro, seed=0)
    batches = [step_batch(data, s, n_micro) for s in range(STEPS)]
    params = model.init(jax.random.key(0), SEQ)
    ref_losses, ref_params = _run(ReferenceTrainer(model, params, optim, STEPS, dtype), batches)
    with OffloadEngine(model, params, plan_fn(spec.n_layers), optim=optim, total_steps=STEPS,
                       micro_batch_shape=(BATCH // n_micro, SEQ), n_micro=n_micro, compute_dtype=dtype,
                       disk_path=disk_path) as eng:
        start = jax.tree.map(np.array, eng.state_dict()) if rerun else None  # a copy: it views live buffers
        losses, params_out = _run(eng, batches)
        if rerun:
            rerun(eng, start, batches, (losses, params_out))
    return ref_losses, losses, ref_params, params_out


def _assert_close(ref_losses, losses, ref_params, params, rtol):
    """Losses to rtol; weights to rtol globally (relative L2) and per leaf on the scale of unit weights.

    Per leaf the bound is absolute for small leaves: a gradient that is mathematically zero (the key bias:
    softmax ignores a constant added to every key) is rounding noise that Adam normalises into full-size
    updates, so its leaf differs by ~1e-6 between any two correct evaluation orders.
    """
    np.testing.assert_allclose(losses, ref_losses, rtol=rtol)
    flat_ref, tree_ref = jax.tree.flatten(ref_params)
    flat, tree = jax.tree.flatten(params)
    assert tree == tree_ref
    diff2 = norm2 = 0.0
    for a, b in zip(flat, flat_ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff2, norm2 = diff2 + np.sum((a - b) ** 2), norm2 + np.sum(b**2)
        assert np.abs(a - b).max() < rtol * max(np.abs(b).max(), 1.0), (np.abs(a - b).max(), np.abs(b).max())
    assert np.sqrt(diff2 / norm2) < rtol / 10


CASES = {
    # name: (model, plan factory, micro-batches, clip)
    "gpt-host-cpu-recompute": ("gpt-tiny", lambda n: uniform_plan(n, activations="recompute"), 1, 0.0),
    "gpt-host-cpu-keep-edges-host": ("gpt-tiny", lambda n: uniform_plan(n, activations="keep", edges_on_gpu=False),
                                     1, 0.0),
    "gpt-hbm-weights-cpu-swap": ("gpt-tiny", lambda n: uniform_plan(n, weights="hbm", activations="save:qkv,mlp_up+swap"),
                                 1, 0.0),
    "gpt-gpu-optim-clip": ("gpt-tiny", lambda n: uniform_plan(n, optim_state="hbm", activations="keep"), 1, 0.5),
    "gpt-mixed-accum": ("gpt-tiny", lambda n: Plan(embed=HOST, head=HBM_CPU, blocks=(
        _with(GPU, "keep+swap"), _with(HOST, "recompute+swap_input"), _with(HBM_CPU, "save:attn_ctx")),
        prefetch_depth=1, keep_turn_blocks=2), 2, 0.0),
    "gpt-mixed-accum-clip": ("gpt-tiny", lambda n: Plan(embed=GPU, head=HOST, blocks=(
        _with(HOST, "keep"), _with(GPU, "recompute"), _with(HOST, "keep+swap+swap_input")),
        prefetch_depth=2, keep_turn_blocks=0), 2, 0.05),
    "llama-host-cpu-clip": ("llama-tiny", lambda n: uniform_plan(n, activations="save:q_rot,k_rot,v+swap"), 1, 0.05),
    "llama-mixed-accum": ("llama-tiny", lambda n: Plan(embed=HOST, head=GPU, blocks=(
        _with(HOST, "recompute"), _with(GPU, "keep+swap_input"), _with(HBM_CPU, "keep"))), 2, 0.0),
    "gpt-chunked-clip": ("gpt-tiny", lambda n: Plan(embed=GPU, head=GPU, blocks=(
        _with(HOST, "recompute+chunks=2+swap_input"), _with(GPU, "recompute+chunks=4"), _with(HOST, "keep"))),
        1, 0.05),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_reference_fp32(case):
    model_name, plan_fn, n_micro, clip = CASES[case]
    _assert_close(*_compare(model_name, plan_fn, n_micro, clip), rtol=1e-5)


@pytest.mark.parametrize("model_name", ["gpt-tiny", "llama-tiny"])
def test_engine_matches_reference_bf16(model_name):
    """bf16 compute: within the tolerance the reference itself shows between two equivalent orderings
    (one batch vs the same batch as two micro-batches)."""
    ref_a, eng, ref_pa, eng_p = _compare(model_name, lambda n: uniform_plan(n, activations="recompute"),
                                         dtype=jnp.bfloat16)
    ref_b, _, ref_pb, _ = _compare(model_name, lambda n: uniform_plan(n), n_micro=2, dtype=jnp.bfloat16)
    ordering_gap = max(abs(a - b) / abs(a) for a, b in zip(ref_a, ref_b))
    loss_gap = max(abs(a - b) / abs(a) for a, b in zip(ref_a, eng))
    assert loss_gap <= max(2 * ordering_gap, 1e-3), (loss_gap, ordering_gap)


@pytest.mark.parametrize("case", ["gpt-mixed-accum", "gpt-mixed-accum-clip", "llama-host-cpu-clip",
                                  "gpt-hbm-weights-cpu-swap"])
def test_counted_traffic_equals_plan(case):
    from lohan_jax.plan import expected_traffic

    model_name, plan_fn, n_micro, clip = CASES[case]
    spec = get_spec(model_name, n_layers=3)
    model = build_model(spec, jnp.float32)
    plan = plan_fn(3)
    optim = OptimConfig(lr=1e-3, clip_norm=clip)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=SEQ, batch_size=BATCH // n_micro, seed=0)
    with OffloadEngine(model, model.init(jax.random.key(0), SEQ), plan, optim=optim, total_steps=2,
                       micro_batch_shape=(BATCH // n_micro, SEQ), n_micro=n_micro, compute_dtype=jnp.float32) as eng:
        eng.step(step_batch(data, 0, n_micro))
        metrics = eng.step(step_batch(data, 1, n_micro))  # steady state: includes step 0's re-uploads
        counted = {k: eng.traffic[k] for k in ("h2d_bytes", "d2h_bytes")}
        expected = expected_traffic(plan, weight_nbytes=[u.w_nbytes for u in eng.units],
                                    residual_nbytes=[p.residual_nbytes for p in eng.block_programs],
                                    ckpt_nbytes=eng.ckpt_nbytes, n_micro=n_micro, tied=eng.edges.tied)
        float(metrics["loss"])
    assert counted == expected
    assert counted["d2h_bytes"] > 0
    if n_micro == 1:  # the per-unit squared gradient norms wait for the step's end in host memory, not in HBM,
        # where such small buffers left between the backward's large ones fragmented XLA's pool (plan_memory)
        assert {p.sharding.memory_kind for p in metrics["grad_norm"].parts} == {eng.spaces.host.memory_kind}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_reference_on_gpu(case, gpu_device):
    """The same exactness on the GPU, where memory-kind transfers are real (on the CPU they compile to
    nothing) and XLA's offload paths have had wrong-gradient bugs."""
    model_name, plan_fn, n_micro, clip = CASES[case]
    with jax.default_device(gpu_device):
        _assert_close(*_compare(model_name, plan_fn, n_micro, clip), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("model_name", ["gpt-tiny", "llama-tiny"])
def test_engine_bf16_on_gpu(model_name, gpu_device):
    with jax.default_device(gpu_device):
        test_engine_matches_reference_bf16(model_name)


def test_plan_over_budget_is_refused_before_allocation():
    from lohan_jax.engine.memory import Budgets, MemoryBudgetError

    spec = get_spec("gpt-tiny", n_layers=2)
    model = build_model(spec, jnp.float32)
    calls = []

    def unit_params(k):
        calls.append(k)
        return model.init_unit(jax.random.key(0), k, SEQ)

    plan = uniform_plan(2, optim_state="hbm", activations="keep")
    with pytest.raises(MemoryBudgetError, match=r"HBM: needs .* GiB, budget"):
        OffloadEngine(model, unit_params, plan, optim=OptimConfig(), total_steps=1, micro_batch_shape=(BATCH, SEQ),
                      compute_dtype=jnp.float32, budgets=Budgets(hbm_bytes=10_000, pinned_bytes=None, host_bytes=None))
    assert calls == []  # refused before any parameter was created
    with pytest.raises(MemoryBudgetError, match="host RAM"):
        OffloadEngine(model, unit_params, uniform_plan(2), optim=OptimConfig(), total_steps=1,
                      micro_batch_shape=(BATCH, SEQ), compute_dtype=jnp.float32,
                      budgets=Budgets(hbm_bytes=None, pinned_bytes=None, host_bytes=1000))


def test_memory_estimate_follows_the_plan():
    from lohan_jax.engine.memory import estimate_memory

    kw = dict(unit_params=[1000, 5000, 5000, 10], compute_itemsize=2, micro_batch=4, seq_len=32, d_model=32,
              d_ff=128, vocab_size=257, residual_nbytes=[4096, 4096], n_micro=1)
    host = estimate_memory(uniform_plan(2), **kw)
    hbm = estimate_memory(uniform_plan(2, optim_state="hbm"), **kw)
    assert hbm.hbm["GPU optimizer state"] == host.hbm["GPU optimizer state"] + 12 * 10_000
    assert host.host["fp32 master + Adam moments"] == 12 * 10_000 and hbm.host["fp32 master + Adam moments"] == 0
    swapped = estimate_memory(uniform_plan(2, activations="recompute+swap_input"), **kw)
    assert swapped.pinned["swapped block inputs"] == 2 * 4 * 32 * 32 * 2 and swapped.hbm["block inputs kept"] == 0
    chunked = estimate_memory(uniform_plan(2, activations="recompute+chunks=4"), **kw)
    assert chunked.hbm["block backward working memory"] < host.hbm["block backward working memory"]


def test_wrong_parameter_shapes_name_the_unit():
    spec = get_spec("gpt-tiny", n_layers=2)
    model = build_model(spec, jnp.float32)
    params = model.init(jax.random.key(0), SEQ)
    params["blocks"][1]["fc"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="block1"):
        OffloadEngine(model, params, uniform_plan(2), optim=OptimConfig(), total_steps=1,
                      micro_batch_shape=(BATCH, SEQ), compute_dtype=jnp.float32)


DISK_CPU = UnitPlan(Tier.HOST, Tier.DISK, UpdateOn.CPU)
DISK_CASES = {
    "gpt-disk": ("gpt-tiny", lambda n: uniform_plan(n, optim_state="disk"), 1, 0.0),
    "gpt-disk-mixed-accum-clip": ("gpt-tiny", lambda n: Plan(embed=DISK_CPU, head=GPU, blocks=(
        _with(DISK_CPU, "recompute"), _with(HOST, "keep"), _with(dataclasses.replace(DISK_CPU, weights=Tier.HBM),
                                                                 "recompute+swap_input"))), 2, 0.05),
    "llama-disk-mixed": ("llama-tiny", lambda n: Plan(embed=GPU, head=DISK_CPU, blocks=(
        _with(GPU, "keep"), _with(DISK_CPU, "recompute+chunks=2"), _with(DISK_CPU, "save:attn_ctx+swap"))), 1, 0.0),
}


@pytest.mark.parametrize("case", list(DISK_CASES))
def test_engine_with_state_on_disk_matches_reference(case, tmp_path):
    """Reordered disk I/O (the plan's default) against the reference; then the naive order (_rerun_naive)."""
    model_name, plan_fn, n_micro, clip = DISK_CASES[case]
    _assert_close(*_compare(model_name, plan_fn, n_micro, clip, disk_path=str(tmp_path), rerun=_rerun_naive),
                  rtol=1e-5)
    assert any(tmp_path.rglob("zarr.json"))


def _rerun_naive(eng, start, batches, reordered):
    """The same steps from the same state in the naive disk I/O order give bit-identical losses and weights (so
    they equal the reference as the reordered run does); every read of disk state is issued by the host worker
    as the unit's update starts, right after the previous unit's write, and none ahead of its update."""
    import threading

    from lohan_jax.plan import DiskIOOrder

    assert eng._disk_reads.reads_ahead > 0  # the reordered run read ahead (the backward asks for the first)
    eng.plan = dataclasses.replace(eng.plan, disk_io_order=DiskIOOrder.NAIVE)
    eng.load_state_dict(start)  # rebuilds the disk reads from the plan
    events, store = [], eng.store
    read, write = store.read, store.write
    store.read = lambda name: events.append(("read", name, threading.current_thread().name)) or read(name)
    store.write = lambda name, state: events.append(("write", name, threading.current_thread().name)) or write(
        name, state)
    try:
        losses = [float(eng.step(b)["loss"]) for b in batches]
        eng.worker.drain()
    finally:
        del store.read, store.write
    assert losses == reordered[0]
    jax.tree.map(np.testing.assert_array_equal, eng.master_params(), reordered[1])
    n_disk = sum(u.on_disk for u in eng.units)
    assert len(events) == 2 * n_disk * len(batches) and {t for *_, t in events} == {"lohan-host-optim"}
    assert [(kind, name) for kind, name, _ in events] == [
        (kind, name) for (_, name, _) in events[::2] for kind in ("read", "write")]  # read i, write i, read j, ...
    assert (eng._disk_reads.reads_ahead, eng._disk_reads.reads_at_update) == (0, n_disk * len(batches))
