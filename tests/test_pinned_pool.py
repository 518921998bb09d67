"""XLA's pinned pool: capped from the run's plan before jax starts (lohan_jax.pinned_pool), counted in RAM."""
import dataclasses
import logging
import os
from types import SimpleNamespace

import pytest

from lohan_jax import pinned_pool, preflight
from lohan_jax.config import load_config
from lohan_jax.engine.memory import Budgets, MemoryBudgetError, check_budgets
from lohan_jax.plan_memory import GIB, PINNED_LIMIT_ENV, PINNED_POOL_RSS_FACTOR, MemoryEstimate, pinned_pool_limit_gib

H100_SMI = "NVIDIA H100 80GB HBM3, 81559, 10000\n"  # name, total and free MiB: ~9.8 GiB of HBM free
RUN = ["model.name=gpt3-1.3b", "train.batch_size=8", "train.seq_len=1024", "train.engine=offload"]


def test_the_margin_is_ten_percent_plus_two_gb_rounded_up():
    assert pinned_pool_limit_gib(0) == 2  # GiB, as XLA reads XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB
    assert pinned_pool_limit_gib(10 * GIB) == 13  # 11 GiB + 2 GB = 12.86 GiB
    assert pinned_pool_limit_gib(43 * GIB) == 50  # the 6B batch-32 plan OOM-killed under a 120 GiB cap


def test_ram_counts_the_pool_at_its_cap_on_the_gpu_only():
    est = MemoryEstimate(hbm={}, pinned={"streamed weights": 40 * GIB}, host={"Adam": 60 * GIB})
    assert est.ram_bytes == 100 * GIB  # the CPU: pinned memory is plain RAM
    pooled = est.with_pinned_pool()
    # counted at the cap, plus the pinned memory seen beyond it
    assert pooled.pinned_pool == int(pinned_pool_limit_gib(40 * GIB) * GIB * PINNED_POOL_RSS_FACTOR)
    assert pooled.ram_bytes > 110 * GIB
    assert est.with_pinned_pool(45 * GIB).pinned_pool == int(45 * GIB * PINNED_POOL_RSS_FACTOR)  # a lower cap
    check_budgets(est, Budgets(None, None, 105 * GIB))
    with pytest.raises(MemoryBudgetError, match="host RAM.*pinned pool counted at its cap"):
        check_budgets(est, Budgets(None, 100 * GIB, 105 * GIB, pinned_limit_bytes=120 * 10**9))


@pytest.fixture
def fake_gpu(monkeypatch):
    """nvidia-smi answering for an H100, jax not started, 120 GiB of RAM, no cap in the environment."""
    for k in (PINNED_LIMIT_ENV, "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", *pinned_pool.MEM_FRACTION_ENVS):
        monkeypatch.delenv(k, raising=False)
    asked = []
    monkeypatch.setattr(pinned_pool, "query_nvidia_smi", lambda gpu: asked.append(gpu) or H100_SMI)
    monkeypatch.setattr(pinned_pool, "jax_started", lambda: False)
    monkeypatch.setattr("lohan_jax.planner.profile.available_ram_gib", lambda: 120.0)
    monkeypatch.setattr(preflight, "_AUTO", {})
    return asked


def test_the_cap_comes_from_the_plan_the_run_then_runs(fake_gpu, monkeypatch, caplog):
    from lohan_jax.planner.capacity import memory
    from lohan_jax.planner.cli import workload_for

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    cfg = load_config(None, RUN)
    with caplog.at_level(logging.INFO, logger="lohan_jax"):
        cap = pinned_pool.cap_pinned_pool(cfg)
    assert fake_gpu == ["3"]  # jax's device 0 is the first visible GPU
    plan = preflight.run_plan(cfg, pinned_pool.gpu_facts())
    need = memory(plan, workload_for(cfg)).pinned_bytes
    assert need > 0 and cap == pinned_pool_limit_gib(need)
    assert os.environ[PINNED_LIMIT_ENV] == str(int(cap)) and f"capped at {int(cap)} GiB" in caplog.text
    # the run resolves train.compute_dtype (auto -> bfloat16) and asks again with jax's device: the same plan,
    # not one re-planned from the HBM jax reports (here none, which would give the profile's 75.6 GiB)
    ran = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compute_dtype="bfloat16"))
    jax_gpu = SimpleNamespace(platform="gpu", id=0, device_kind="NVIDIA H100 80GB HBM3", memory_stats=lambda: {})
    assert preflight.run_plan(ran, jax_gpu) == plan


def test_a_cap_already_set_is_kept_and_one_below_the_need_refused(fake_gpu, monkeypatch, capsys):
    cfg = load_config(None, RUN)
    monkeypatch.setenv(PINNED_LIMIT_ENV, "100")
    assert pinned_pool.cap_pinned_pool(cfg) == 100.0
    assert os.environ[PINNED_LIMIT_ENV] == "100"
    monkeypatch.setenv(PINNED_LIMIT_ENV, "1")
    from lohan_jax.cli import main
    assert main(["train", *(a for kv in RUN for a in ("--set", kv)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pinned host memory: needs" in err and f"raise {PINNED_LIMIT_ENV} to" in err and "shrink the plan" in err


def test_nothing_changes_on_the_cpu(fake_gpu, monkeypatch):
    cfg = load_config(None, RUN)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert pinned_pool.gpu_facts() is None and pinned_pool.cap_pinned_pool(cfg) is None and not fake_gpu
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.setattr(pinned_pool, "query_nvidia_smi", lambda gpu: None)  # no nvidia-smi
    assert pinned_pool.cap_pinned_pool(cfg) is None
    assert pinned_pool.cap_pinned_pool(load_config(None, [*RUN, "train.engine=reference"])) is None
    assert PINNED_LIMIT_ENV not in os.environ
