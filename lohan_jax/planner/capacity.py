"""Bytes a plan needs per tier (HBM, pinned host, pageable host, disk) and the machine's budgets.

The HBM, pinned and pageable terms are the engine's own accounting (lohan_jax/engine/memory.py, which
refuses a plan over budget); tests/test_planner.py checks that every plan the planner emits passes it. The
disk tier holds optimizer state (the engine's StateStore, staged through RAM) and, in the planner only,
bf16 weights (staged through pinned memory instead of resident there).
"""
from __future__ import annotations

import dataclasses

from lohan_jax.plan import Plan
from lohan_jax.plan_memory import MemoryEstimate, estimate_memory
from lohan_jax.planner.profile import GIB, MachineProfile
from lohan_jax.planner.workload import Workload

RUNTIME_HOST_NBYTES = 4 * GIB  # Python, jax, the CUDA context and the data pipeline (observed ~3-5 GiB RSS)


@dataclasses.dataclass(frozen=True)
class Margins:
    # the engine refuses above 95% of the limit; 2% more for what XLA holds besides our buffers (the largest
    # contiguous temporary has its own "fragmentation reserve" in the estimate, lohan_jax/plan_memory.py)
    hbm: float = 0.07
    ram: float = 0.08
    pinned: float = 0.05
    disk: float = 0.05


Memory = MemoryEstimate


def memory(plan: Plan, wl: Workload) -> Memory:
    """The engine's accounting (lohan_jax.plan_memory) for this workload on a GPU, plus the runtime's own RSS;
    RAM counts XLA's pinned pool at the cap `lohan-jax train` sets from the plan (plan_memory.pinned_pool_limit_gib)."""
    m = wl.model
    return estimate_memory(plan, unit_params=m.unit_params(), compute_itemsize=m.itemsize, micro_batch=wl.micro_batch,
                           seq_len=m.seq_len, d_model=m.d_model, d_ff=m.d_ff, vocab_size=m.vocab_size,
                           residual_nbytes=[wl.residual_nbytes(b.activations) for b in plan.blocks],
                           n_micro=wl.n_micro, runtime_nbytes=RUNTIME_HOST_NBYTES, hold_grads=wl.clip
                           ).with_pinned_pool()


@dataclasses.dataclass(frozen=True)
class Budgets:
    hbm: int
    pinned: int | None
    ram: int
    disk: int


def budgets(machine: MachineProfile, margins: Margins = Margins()) -> Budgets:
    pinned = int(machine.pinned_limit_gib * GIB * (1 - margins.pinned)) if machine.pinned_limit_gib else None
    scaled = lambda gib, margin: int(gib * GIB * (1 - margin))
    return Budgets(hbm=scaled(machine.hbm_gib, margins.hbm), pinned=pinned, ram=scaled(machine.ram_gib, margins.ram),
                   disk=scaled(machine.disk_gib, margins.disk))


def overflow(mem: Memory, b: Budgets) -> dict[str, int]:
    """Bytes over budget per tier (empty when the plan fits)."""
    over = {"hbm": mem.hbm_bytes - b.hbm, "ram": mem.ram_bytes - b.ram, "disk": mem.disk_bytes - b.disk}
    if b.pinned is not None:
        over["pinned"] = mem.pinned_bytes - b.pinned
    return {k: v for k, v in over.items() if v > 0}
