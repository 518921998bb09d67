"""plan: auto — the planner's plan for a run config, or a refusal saying what would make it fit."""
import dataclasses

import pytest

from lohan_jax.config import load_config
from lohan_jax.planner.auto import PlanRefused, auto_plan, with_run_caps
from lohan_jax.planner.machines import machine


def _cfg(model, batch, *sets):
    return load_config(None, [f"model.name={model}", f"train.batch_size={batch}", "train.seq_len=1024", *sets])


def test_six_b_on_the_h100_gets_an_executable_plan_with_a_prediction():
    got = auto_plan(_cfg("paper-6b", 8), machine("h100-80g"))
    assert got.plan.engine_executable and len(got.plan.blocks) == 28
    assert got.prediction.step_s > 0 and got.plan.predicted_step_s == pytest.approx(got.prediction.step_s)
    assert "predicted" in got.summary and got.plan.predicted_bottleneck


def test_run_caps_bound_the_machine():
    class Offload:
        hbm_budget_gib, host_budget_gib = 24.0, 110.0
    m = with_run_caps(machine("h100-80g"), Offload())
    assert (m.hbm_gib, m.ram_gib) == (24.0, 110.0)
    capped = auto_plan(_cfg("paper-6b", 8), m)
    assert capped.prediction.step_s >= auto_plan(_cfg("paper-6b", 8), machine("h100-80g")).prediction.step_s


def test_a_model_that_cannot_fit_is_refused_with_fixes():
    small = dataclasses.replace(machine("h100-80g"), ram_gib=16.0, disk_gib=0.0, disk_path="")
    with pytest.raises(PlanRefused, match="smallest changes") as e:
        auto_plan(_cfg("paper-13b", 8), small)
    assert "paper-13b" in str(e.value) and "GiB" in str(e.value)


def test_run_plan_picks_file_auto_or_uniform(tmp_path):
    from types import SimpleNamespace

    from lohan_jax.plan import uniform_plan
    from lohan_jax.preflight import run_plan

    gpu = SimpleNamespace(platform="gpu", id=0, device_kind="NVIDIA H100 80GB HBM3")
    cpu = SimpleNamespace(platform="cpu", id=0, device_kind="cpu")
    cfg = _cfg("paper-6b", 8, "offload.machine=h100-80g")
    planned = run_plan(cfg, gpu)
    assert planned == auto_plan(cfg, machine("h100-80g")).plan and planned.predicted_step_s > 0
    uniform = uniform_plan(28)
    assert run_plan(cfg, cpu) == uniform  # the CPU has no tiers to plan: the uniform fields apply
    assert run_plan(_cfg("paper-6b", 8, "offload.plan=uniform"), gpu) == uniform
    planned.save(tmp_path / "p.json")
    assert run_plan(_cfg("paper-6b", 8, f"offload.plan_file={tmp_path / 'p.json'}", "offload.plan=uniform"), gpu) \
        == planned


def test_unknown_plan_mode_is_a_config_error():
    from lohan_jax.config import ConfigError
    with pytest.raises(ConfigError, match="offload.plan"):
        _cfg("gpt-tiny", 2, "offload.plan=best")
