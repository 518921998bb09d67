"""Data parallel on several devices (DataParallelEngine, lohan_jax.planner.parallel): N steps on 2 and 4 CPU
devices equal the one-device reference trainer on the same global batch, for host and HBM state placements;
the N-GPU cost model reduces to the one-GPU one at N=1 and reproduces the paper's 2- and 4-GPU scaling.

The suite's process has 2 CPU devices (conftest.py); the 4-device runs are this file as a script, in a
subprocess whose XLA_FLAGS force 4 before jax starts there, compared with the references computed here.
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import _assert_close  # tests/ is on sys.path (pytest rootdir, or this file run as a script)

from lohan_jax.batches import step_batch
from lohan_jax.config import OptimConfig
from lohan_jax.data import open_dataset
from lohan_jax.engine import DataParallelEngine, OffloadEngine
from lohan_jax.models import build_model, get_spec
from lohan_jax.plan import ActivationPolicy, Plan, Tier, UnitPlan, UpdateOn, uniform_plan
from lohan_jax.reference import ReferenceTrainer

STEPS, BATCH, SEQ = 3, 8, 32
HOST = UnitPlan(Tier.HOST, Tier.HOST, UpdateOn.CPU)
HBM_CPU = UnitPlan(Tier.HBM, Tier.HOST, UpdateOn.CPU)
GPU = UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU)
ROOT = Path(__file__).resolve().parents[1]


def _with(u: UnitPlan, act: str) -> UnitPlan:
    return dataclasses.replace(u, activations=ActivationPolicy.parse(act))


# every placement at once: blocks with state on the host (streamed or resident weights) and in HBM
MIXED = Plan(embed=HOST, head=GPU, blocks=(_with(GPU, "keep+swap"), _with(HOST, "recompute+swap_input"),
                                            _with(HBM_CPU, "save:attn_ctx")), prefetch_depth=1, keep_turn_blocks=2)
MIXED_EDGES_SPLIT = Plan(embed=GPU, head=HBM_CPU, blocks=(_with(HOST, "keep"), _with(GPU, "recompute+chunks=2"),
                                                           _with(HOST, "keep+swap+swap_input")))


def _setup(model_name: str, n_micro: int, clip: float):
    spec = get_spec(model_name, n_layers=3)
    model = build_model(spec, jnp.float32)
    optim = OptimConfig(lr=3e-3, weight_decay=0.1, clip_norm=clip, warmup_steps=1)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=SEQ, batch_size=BATCH // n_micro, seed=0)
    batches = [step_batch(data, s, n_micro) for s in range(STEPS)]
    return model, optim, batches, model.init(jax.random.key(0), SEQ)


def _run(trainer, batches):
    losses = [float(trainer.step(b)["loss"]) for b in batches]
    return losses, trainer.master_params()


CASES = {
    # name: (model, micro-batches, clip, {devices: plan}); one reference per case
    "gpt-fast-path": ("gpt-tiny", 1, 0.0, {2: uniform_plan(3, activations="recompute"),  # host state
                                            4: MIXED_EDGES_SPLIT}),  # updates overlapping the backward
    "llama-accumulate-clip": ("llama-tiny", 2, 0.05, {2: MIXED,  # host and GPU accumulators, global norm
                                                       4: uniform_plan(3, activations="save:q_rot,k_rot,v+swap")}),
}


def run_case(case: str, devices: int | None = None):
    """The reference's (losses, weights) on the case's batches, or the data-parallel engine's on `devices`."""
    model_name, n_micro, clip, plans = CASES[case]
    model, optim, batches, params = _setup(model_name, n_micro, clip)
    if devices is None:
        return _run(ReferenceTrainer(model, params, optim, STEPS, jnp.float32), batches)
    with DataParallelEngine(model, params, plans[devices], optim=optim, total_steps=STEPS, micro_batch_shape=(
            BATCH // n_micro, SEQ), n_micro=n_micro, compute_dtype=jnp.float32, devices=devices) as eng:
        assert eng.n_devices == devices
        return _run(eng, batches)


def assert_close(ref, got, rtol=1e-5):
    """tests/test_engine.py's tolerance: losses to rtol, weights per leaf and as a whole (relative L2)."""
    (ref_losses, ref_params), (losses, params) = ref, got
    _assert_close(ref_losses, losses, ref_params, params, rtol)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """This file as a script, in a process with 4 CPU devices, running beside the references (XLA's CPU
    compiles are mostly single-threaded, and the suite has 2 cores)."""
    out = tmp_path_factory.mktemp("four_devices")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def references(four_devices):  # (asks for four_devices first: it starts before the references compile)
    return {case: run_case(case) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_two_devices_match_reference(case, references):
    assert_close(references[case], run_case(case, devices=2))


def test_four_devices_match_reference(four_devices, references):
    proc, out = four_devices
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    for case, ref in references.items():
        saved = np.load(out / f"{case}.npz")
        leaves = [saved[f"leaf{i}"] for i in range(len(saved.files) - 1)]
        assert_close(ref, (list(saved["losses"]), jax.tree.unflatten(jax.tree.structure(ref[1]), leaves)))


@pytest.mark.gpu
@pytest.mark.parametrize("n_gpus", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_gpus_match_reference(case, n_gpus):
    """The same on real GPUs, where the collectives are NCCL's and the memory-kind transfers are real."""
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    if len(gpus) < n_gpus:
        pytest.skip(f"needs {n_gpus} GPUs")
    with jax.default_device(gpus[0]):
        assert_close(run_case(case), run_case(case, devices=n_gpus))


def test_state_dict_is_unpadded_and_interchangeable():
    """A data-parallel engine's state loads into a one-device engine (and back) with the same weights."""
    model, optim, batches, params = _setup("gpt-tiny", 1, 0.0)
    kw = dict(optim=optim, total_steps=STEPS, micro_batch_shape=(BATCH, SEQ), compute_dtype=jnp.float32)
    with DataParallelEngine(model, params, MIXED_EDGES_SPLIT, devices=2, **kw) as dp:
        dp.step(batches[0])
        state, trained = dp.state_dict(), dp.master_params()
        eval_dp = float(dp.eval_loss(batches[1]))
    with OffloadEngine(model, params, MIXED_EDGES_SPLIT, **kw) as one, \
            DataParallelEngine(model, params, MIXED_EDGES_SPLIT, devices=2, **kw) as again:
        one.load_state_dict(state)
        again.load_state_dict(one.state_dict())
        for restored in (one.master_params(), again.master_params()):
            jax.tree.map(np.testing.assert_array_equal, restored, trained)
        np.testing.assert_allclose(float(one.eval_loss(batches[1])), eval_dp, rtol=1e-6)
        assert [s["master"].shape for s in state["units"]] == [s["master"].shape for s in one.state_dict()["units"]]


def test_batch_must_split_over_the_devices():
    model, optim, _, params = _setup("gpt-tiny", 1, 0.0)
    with pytest.raises(ValueError, match="offload.devices=2"):
        DataParallelEngine(model, params, uniform_plan(3), optim=optim, total_steps=1, micro_batch_shape=(3, SEQ),
                           compute_dtype=jnp.float32, devices=2)
    with pytest.raises(ValueError, match="offload.devices=9 but this host has 2"):
        DataParallelEngine(model, params, uniform_plan(3), optim=optim, total_steps=1, micro_batch_shape=(8, SEQ),
                           compute_dtype=jnp.float32, devices=9)


# ---- the N-GPU cost model (no jax) ----------------------------------------------------------------------
def _planner():
    from lohan_jax.planner import machine, model_profile_from_spec
    from lohan_jax.planner import parallel as par
    return par, machine, model_profile_from_spec


def test_cost_model_on_one_gpu_is_the_one_gpu_model():
    from lohan_jax.planner import Workload, predict

    par, machine, profile = _planner()
    mp = profile(get_spec("paper-6b"), 1024, 2)
    plan, m = uniform_plan(mp.n_layers, activations="recompute+swap_input"), machine("h100-80g")
    one = predict(plan, Workload(mp, 8), m)
    same = par.predict_data_parallel(plan, Workload(mp, 8), m, par.Interconnect(n_gpus=1))
    assert same.step_s == pytest.approx(one.step_s, rel=1e-4) and same.collective_s == 0.0
    two = par.predict_data_parallel(plan, Workload(mp, 16), m, par.interconnect("h100-sxm-x2"))
    slow = par.predict_data_parallel(plan, Workload(mp, 16), m, par.interconnect("h100-sxm-x2").with_(
        all_gather_gbps=5.0, reduce_scatter_gbps=5.0, pcie_h2d_total_gbps=m.h2d_gbps, pcie_d2h_total_gbps=m.d2h_gbps))
    assert one.step_s * 0.9 < two.step_s < slow.step_s and slow.collective_s > two.collective_s > 0
    # per step: each unit gathered at each use (embedding 3x: forward, tied head, backward), each reduced once
    ic = par.interconnect("h100-sxm-x2")
    L, w, r = mp.n_layers, lambda p: ic.all_gather_s(2 * p), lambda p: ic.reduce_scatter_s(4 * p)
    expected = (3 * w(mp.embed_params) + r(mp.embed_params) + L * (2 * w(mp.block_params) + r(mp.block_params))
                + w(mp.head_params) + r(mp.head_params))
    assert two.collective_s == pytest.approx(expected)


def test_cost_model_reproduces_the_papers_data_parallel_scaling():
    """PAPER.md: 13B on 1, 2 and 4 RTX 4090s at 156, 278 and 514 TFLOPS (1.78x, 3.29x); the planner, on the
    described testbed and PCIe-only interconnect (no P2P on 4090s), at the paper's batch 64 per GPU."""
    from lohan_jax.planner import Workload, search

    par, machine, profile = _planner()
    mp, m = profile(get_spec("paper-13b"), 1024, 2), machine("paper-4090-256g")
    one = search(Workload(mp, 64), m).prediction
    for n, paper in ((2, 278 / 156), (4, 514 / 156)):
        result, pred = par.plan_data_parallel(Workload(mp, 64 * n), m, par.interconnect(f"paper-4090-x{n}"))
        assert result.plan is not None
        assert pred.tokens_per_s / one.tokens_per_s == pytest.approx(paper, rel=0.1)


def test_interconnect_files_and_measurement(tmp_path):
    from lohan_jax.engine import data_parallel

    par, _, _ = _planner()
    assert par.SHARD_ALIGN == data_parallel.SHARD_ALIGN
    measured = par.measure_interconnect(nbytes=1 << 16, reps=1)  # the suite's 2 CPU devices
    assert measured.n_gpus == 2 and min(measured.all_gather_gbps, measured.reduce_scatter_gbps) > 0
    par.save_interconnect(measured, tmp_path / "ic.yaml")
    assert par.interconnect(str(tmp_path / "ic.yaml")) == measured
    (tmp_path / "bad.yaml").write_text("all_gather_gbs: 3\n")
    with pytest.raises(ValueError, match="did you mean|known keys"):
        par.interconnect(str(tmp_path / "bad.yaml"))


def test_benchmark_refuses_without_enough_gpus(tmp_path):
    """experiments/bench_data_parallel.py measures nothing and says why on a host with too few devices (its
    whole run on 4 forced CPU devices and gpt-tiny is the plumbing check: ~40 s, not part of the suite)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/bench_data_parallel.py"), "--gpus", "1,4",
                           "--out", str(tmp_path / "rows.jsonl")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refused: this host has 2 CPU device(s) and the study needs 4" in proc.stderr
    assert not (tmp_path / "rows.jsonl").exists()


if __name__ == "__main__":  # the 4-device process: the suite's strict settings (conftest.py), then each case
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.local_devices()) == 4, jax.local_devices()
    for case in CASES:
        losses, params = run_case(case, devices=4)
        leaves = {f"leaf{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(params))}
        np.savez(Path(sys.argv[1]) / f"{case}.npz", losses=np.asarray(losses), **leaves)
