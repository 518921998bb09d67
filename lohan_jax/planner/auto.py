"""`offload.plan: auto`: the planner decides the run's placements from the machine it runs on.

The machine is a described profile (`offload.machine`: a built-in name or a profile JSON/YAML) or, by default,
the built-in profile of this GPU model (rates measured on it) with today's capacities read live: free HBM,
available RAM (cgroup-aware), free disk at `offload.disk_path`. A GPU we have no profile of is measured quickly
(seconds). The run's own caps (`offload.hbm_budget_gib`, `host_budget_gib`) bound the plan as they bound the
engine. A model that cannot fit is refused with the numbers and the smallest changes that would make it fit.
Pure python and the planner, except `live_machine`, which asks jax for the device.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from lohan_jax.plan import Plan
from lohan_jax.planner.cost import Prediction
from lohan_jax.planner.profile import MachineProfile

log = logging.getLogger(__name__)


class PlanRefused(ValueError):
    """No plan fits this machine: the message has the numbers and what would make it fit."""


@dataclasses.dataclass(frozen=True)
class AutoPlan:
    plan: Plan
    prediction: Prediction
    machine: MachineProfile
    summary: str  # the planner's explanation (tiers, per-block choices, bottleneck)


def with_run_caps(m: MachineProfile, offload: Any) -> MachineProfile:
    """The run's caps on HBM and host RAM apply to the plan as they apply to the engine's budgets."""
    if offload.hbm_budget_gib:
        m = m.with_(hbm_gib=min(m.hbm_gib, offload.hbm_budget_gib) if m.hbm_gib else offload.hbm_budget_gib)
    if offload.host_budget_gib:
        m = m.with_(ram_gib=min(m.ram_gib, offload.host_budget_gib) if m.ram_gib else offload.host_budget_gib)
    return m


def live_machine(offload: Any, device: Any = None) -> MachineProfile:
    """This machine: `offload.machine` if named, else the built-in profile of this GPU with live capacities.
    `device` may be lohan_jax.pinned_pool.GpuFacts (before jax starts), which carries its free HBM; a cap on
    XLA's pinned pool already in the environment (the user's) bounds the plan's pinned memory."""
    import os

    from lohan_jax.engine.memory import pinned_limit_nbytes
    from lohan_jax.plan_memory import PINNED_LIMIT_ENV
    from lohan_jax.planner.machines import BUILTIN, machine
    from lohan_jax.planner.profile import available_ram_gib, disk_free_gib

    if offload.machine:
        return with_run_caps(machine(offload.machine), offload)
    import jax

    from lohan_jax.planner.measure import free_hbm_gib, measure_machine

    device = device or jax.devices()[0]
    known = [m for m in BUILTIN.values() if m.gpu == device.device_kind]
    disk_path = offload.disk_path
    if known:
        hbm = getattr(device, "hbm_free_gib", None)
        m = known[0].with_(hbm_gib=(free_hbm_gib(device) if hbm is None else hbm) or known[0].hbm_gib,
                           ram_gib=available_ram_gib(), source=f"{known[0].source}; capacities read live")
        if os.environ.get(PINNED_LIMIT_ENV):
            m = m.with_(pinned_limit_gib=pinned_limit_nbytes() / 2**30)
        m = m.with_(**(dict(disk_gib=disk_free_gib(disk_path), disk_path=disk_path) if disk_path
                       else dict(disk_gib=0.0, disk_path="")))
    else:
        log.info("no built-in profile of %s: measuring this machine (quick)", device.device_kind)
        m = measure_machine(disk_path=disk_path, quick=True)
    return with_run_caps(m, offload)


def auto_plan(cfg: Any, machine: MachineProfile) -> AutoPlan:
    """The planner's plan for the run config on `machine`, or PlanRefused saying what would make it fit."""
    from lohan_jax.planner.cli import workload_for
    from lohan_jax.planner.explain import bottleneck, format_result
    from lohan_jax.planner.search import SearchOptions, search, suggestions

    wl = workload_for(cfg)
    # the engine runs optimizer state on disk, not weights on disk: plan with the disk only where it has a path
    opts = SearchOptions(allow_disk=None if machine.disk_gib and machine.disk_path else False)
    result = search(wl, machine, opts)
    if result.plan is None or not result.executable:
        fixes = suggestions(wl, machine, opts, executable_only=True) or \
            ["none found: a larger GPU, more RAM, or a smaller model"]
        why = format_result(result) if result.plan is None else \
            "the only plans that fit put bf16 weights on disk, which the engine does not run yet"
        raise PlanRefused(f"{cfg.model.name} at batch {wl.batch_size} x {wl.model.seq_len} does not fit "
                          f"{machine.name}:\n{why}\nsmallest changes that would make it fit:\n"
                          + "\n".join(f"  - {s}" for s in fixes))
    resource, _ = bottleneck(result.plan, wl, machine, result.prediction)
    step_s = result.prediction.step_s
    plan = dataclasses.replace(result.plan, predicted_bottleneck=resource, predicted_step_s=step_s, notes=(
        f"plan: auto for {cfg.model.name}, batch {wl.batch_size} x {wl.model.seq_len} in {wl.n_micro} "
        f"micro-batch(es), on {machine.name}; predicted {step_s:.3f} s/step", *result.plan.notes))
    return AutoPlan(plan, result.prediction, machine, format_result(result))
