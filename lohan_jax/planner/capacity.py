"""Bytes a plan needs per tier (HBM, pinned host, pageable host, disk) and the machine's budgets.

The HBM, pinned and pageable terms are the engine's own accounting (lohan_jax/engine/memory.py, which
refuses a plan over budget); tests/test_planner.py checks that every plan the planner emits passes it. The
disk tier holds optimizer state (the engine's StateStore, staged through RAM) and, in the planner only,
bf16 weights (staged through pinned memory instead of resident there).
"""
from __future__ import annotations

import dataclasses

from lohan_jax.plan import Plan, Tier, UpdateOn
from lohan_jax.planner.profile import GIB, MachineProfile
from lohan_jax.planner.workload import Workload

HEAD_CHUNK_NBYTES = GIB  # EdgePrograms' fp32-logits chunk
RUNTIME_HOST_NBYTES = 4 * GIB  # Python, jax, the CUDA context and the data pipeline (observed ~3-5 GiB RSS)


@dataclasses.dataclass(frozen=True)
class Margins:
    hbm: float = 0.07  # the engine refuses above 95% of the limit; XLA fragments the rest
    ram: float = 0.08
    pinned: float = 0.05
    disk: float = 0.05


@dataclasses.dataclass(frozen=True)
class Memory:
    hbm: dict
    pinned: dict
    host: dict  # pageable host memory
    disk: dict

    @property
    def hbm_bytes(self) -> int:
        return sum(self.hbm.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(self.pinned.values())

    @property
    def ram_bytes(self) -> int:
        return sum(self.host.values()) + self.pinned_bytes

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())


def block_work_nbytes(chunks: int, tokens: int, d: int, f: int, itemsize: int, w_nbytes: int) -> int:
    """XLA temporaries of a block backward (engine/memory.py: (16D + 4F) x 2 bytes per token, calibrated on
    a recomputed paper-6b block at 64 x 1024 tokens)."""
    work = tokens // chunks * (16 * d + 4 * f) * itemsize
    if chunks > 1:  # fp32 weight-gradient accumulator, the sliced input and the stacked input gradient
        work += 2 * w_nbytes + 2 * tokens * d * itemsize
    return work


def memory(plan: Plan, wl: Workload) -> Memory:
    m, units, blocks = wl.model, plan.units, plan.blocks
    w = wl.weight_nbytes()
    params = m.unit_params()
    block_w = max(w[1:-1]) if blocks else 0
    tokens, ckpt = wl.micro_tokens, wl.ckpt_nbytes
    res = [wl.residual_nbytes(b.activations) for b in blocks]
    cpu = [u.update_on is UpdateOn.CPU for u in units]
    gpu = [not c for c in cpu]
    on_disk_s = [u.optim_state is Tier.DISK for u in units]
    on_disk_w = [u.weights is Tier.DISK for u in units]
    accumulate = wl.n_micro > 1
    hbm = {
        "resident weights": sum(wi for u, wi in zip(units, w) if u.weights is Tier.HBM),
        "GPU optimizer state": sum(12 * p for p, g in zip(params, gpu) if g),
        "GPU gradient accumulators": sum(4 * p for p, g in zip(params, gpu) if g and accumulate),
        "streamed weights in flight": (plan.prefetch_depth + 1 + plan.keep_turn_blocks) * block_w,
        "block inputs kept": sum(ckpt for b in blocks if not b.activations.swap_input),
        "residuals kept": sum(r for b, r in zip(blocks, res) if not b.activations.swap),
        "swapped activations in flight": (plan.prefetch_depth + 1) * (ckpt + max(res, default=0)),
        "block backward working memory": max((block_work_nbytes(b.activations.chunks, tokens, m.d_model, m.d_ff,
                                                                 m.itemsize, wi) for b, wi in zip(blocks, w[1:-1])),
                                              default=0),
        "head working memory": 3 * min(tokens * m.vocab_size * 4, HEAD_CHUNK_NBYTES) + 3 * ckpt + 2 * w[0],
    }
    n_disk_w = sum(on_disk_w)
    staged = min(n_disk_w, plan.prefetch_depth + 2)  # disk weights (planner-only): staged, not resident
    disk_state = [p for p, ds in zip(params, on_disk_s) if ds]
    pinned = {
        "streamed weights": sum(wi for wi, c, dw in zip(w, cpu, on_disk_w) if c and not dw) + staged * block_w,
        "gradients in flight": sum(wi for wi, c, dw in zip(w, cpu, on_disk_w) if c and not dw) + staged * block_w,
        "swapped block inputs": sum(ckpt for b in blocks if b.activations.swap_input),
        "swapped residuals": sum(r for b, r in zip(blocks, res) if b.activations.swap),
    }
    host = {
        "fp32 master + Adam moments": sum(12 * p for p, c, ds in zip(params, cpu, on_disk_s) if c and not ds),
        # reads in flight (prefetch_depth + 1) and writes in flight (2, each with TensorStore's encoded copy)
        "disk state staging": (plan.prefetch_depth + 5) * 12 * max(disk_state, default=0),
        "gradient accumulators": sum(4 * p for p, c in zip(params, cpu) if c and accumulate),
        "runtime": RUNTIME_HOST_NBYTES,
    }
    disk = {
        "fp32 master + Adam moments": sum(12 * p for p, ds in zip(params, on_disk_s) if ds),
        "bf16 weights": sum(wi for wi, dw in zip(w, on_disk_w) if dw),
    }
    return Memory(hbm, pinned, host, disk)


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
