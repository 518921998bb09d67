"""XLA's pinned host pool, capped from the run's plan before jax starts its GPU client.

XLA reads XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB once, as its GPU backend starts (the first jax.devices() or array op),
and its pool grows up to that cap and never shrinks: under a cap far above the plan's need it can take up to ~2x
the need (the measurement is at plan_memory.pinned_pool_limit_gib). So `lohan-jax train` resolves the plan first,
from what nvidia-smi says of the GPU (its name picks the built-in machine profile; its memory stands for the HBM
jax will report), and caps the pool at the plan's pinned need plus the margin; the run then runs that same plan
(preflight.run_plan keeps it). A cap the user set is kept, and a plan over it is refused here, before jax starts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

from lohan_jax.plan_memory import GIB, PINNED_LIMIT_ENV, pinned_pool_limit_gib

log = logging.getLogger(__name__)
# XLA's GPU allocator may use this fraction of the card's memory (jax's default: 0.75)
MEM_FRACTION_ENVS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """The GPU jax will use as its device 0, read by nvidia-smi: stands in for jax's device in run_plan."""

    device_kind: str  # nvidia-smi's name, which is jax's device_kind (e.g. "NVIDIA H100 80GB HBM3")
    hbm_free_gib: float  # what XLA's allocator will allow: the memory fraction of the card, at most what is free
    platform: str = "gpu"
    id: int = 0


def query_nvidia_smi(gpu: str) -> str | None:
    """nvidia-smi's "name, memory.total, memory.free" (MiB) of `gpu` (an index or UUID); None without one."""
    try:
        return subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=name,memory.total,memory.free",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_facts() -> GpuFacts | None:
    """The GPU jax will start on, or None: JAX_PLATFORMS names no GPU, none is visible, or nvidia-smi cannot say."""
    platforms = {p.strip() for p in os.environ.get("JAX_PLATFORMS", "").lower().split(",") if p.strip()}
    if platforms and not platforms & {"cuda", "gpu"}:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible is not None else "0"
    if first in ("", "-1"):
        return None
    out = query_nvidia_smi(first)
    try:
        name, total_mib, free_mib = (f.strip() for f in (out or "").strip().splitlines()[0].rsplit(",", 2))
        total, free = float(total_mib) / 1024, float(free_mib) / 1024
        fraction = float(next((os.environ[k] for k in MEM_FRACTION_ENVS if os.environ.get(k)), 0.75))
    except (IndexError, ValueError):
        return None
    return GpuFacts(name, min(total * fraction, free))


def jax_started() -> bool:
    """Whether jax's backends are up already (then XLA has read its pinned cap and setting it does nothing)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False


def cap_pinned_pool(cfg) -> float | None:
    """Before jax starts: cap XLA's pinned pool at the run's plan's pinned need plus the margin (set
    XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB) and return the cap in GiB. A cap already set is kept (returned), and a plan
    whose pinned need is over it is refused (MemoryBudgetError). None where there is no pool to cap from a plan:
    the CPU, no nvidia-smi, the reference or data-parallel engine, or jax already started."""
    from lohan_jax.config import ConfigError, EngineKind

    if cfg.train.engine is not EngineKind.OFFLOAD or cfg.offload.devices > 1 or jax_started():
        return None
    gpu = gpu_facts()
    if gpu is None:
        return None
    from lohan_jax.engine.memory import Budgets, check_budgets
    from lohan_jax.planner.auto import PlanRefused
    from lohan_jax.planner.capacity import memory
    from lohan_jax.planner.cli import workload_for
    from lohan_jax.preflight import run_plan

    given = os.environ.get(PINNED_LIMIT_ENV)
    try:
        est = memory(run_plan(cfg, gpu), workload_for(cfg))
    except PlanRefused as e:  # offload.plan auto plans under the user's cap (planner.auto.live_machine)
        if given and "pinned:" in str(e):
            raise PlanRefused(f"{e}\n  - or a larger cap on XLA's pinned pool: {PINNED_LIMIT_ENV}={given} is set "
                              "(unset, lohan-jax caps it at the plan's pinned need + 10% + 2 GB)") from None
        raise
    cap_gib = pinned_pool_limit_gib(est.pinned_bytes)
    if given:
        try:
            limit_gib = float(given)
        except ValueError:
            raise ConfigError(f"{PINNED_LIMIT_ENV}={given!r} is not a number (of GiB, as XLA reads it)") from None
        # the engine's pinned budget (engine.memory.machine_budgets: 5% under XLA's cap), checked now
        check_budgets(est, Budgets(None, int(limit_gib * GIB * 0.95), None))
        log.info("XLA's pinned host pool: capped at %g GiB by %s (the plan needs %.2f GiB pinned; unset, lohan-jax "
                 "would cap it at %d GiB)", limit_gib, PINNED_LIMIT_ENV, est.pinned_bytes / GIB, cap_gib)
        return limit_gib
    os.environ[PINNED_LIMIT_ENV] = str(cap_gib)
    log.info("XLA's pinned host pool: capped at %d GiB (%s): the plan's pinned need, %.2f GiB, + 10%% + 2 GB",
             cap_gib, PINNED_LIMIT_ENV, est.pinned_bytes / GIB)
    return float(cap_gib)
