"""The memory a plan implies, per tier: one accounting shared by the engine (which refuses a plan over budget
before allocating) and the planner (which searches under the same budgets). Pure Python, no jax.

The block backward's working memory was calibrated on the GPU machine: a recomputed GPT block (paper-6b,
64 x 1024 tokens) needed 15.64 GiB of XLA temporaries, i.e. (16*D + 4*F) * 2 bytes per token.
"""
from __future__ import annotations

import dataclasses
import math

from lohan_jax.plan import Plan, Tier, UpdateOn

GIB = 2**30
# XLA's pinned host pool is a BFC allocator: it grows by doubling regions up to XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB
# and never shrinks, so under a cap far above the need it holds up to ~2x the need. On the H100 machine a 6B
# batch-32 plan needing 43 GiB pinned + 63 GiB pageable was OOM-killed under a 120 GB cap, and ran under a cap of
# its need + 10% + 2 GB (lohan_jax.pinned_pool sets it; the studies pass it to bench_step).
PINNED_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"  # XLA's cap on its pinned host pool, read as jax starts,
# in GiB despite the name (xla/pjrt/gpu: limit_gb * (1 << 30)). Until 2026-11-26 we read it as GB, and under a cap of
# "33" (33 GiB, counted here as 30.7) the process held 36.0 GiB of shared (pinned) memory: a 7.46B model planned at
# 98.7% of the RAM budget was OOM-killed at 124.2 GiB RSS (experiments/results/fault_recovery.jsonl). RAM counts
# the pool at its cap times PINNED_POOL_RSS_FACTOR: the pinned memory seen beyond the cap (36.0 / 33 GiB).
PINNED_POOL_RSS_FACTOR = 1.1
PINNED_POOL_MARGIN = 0.10
PINNED_POOL_SLACK_NBYTES = 2 * 10**9
HEAD_CHUNK_NBYTES = GIB  # EdgePrograms' fp32-logits chunk
# Disk-resident optimizer state in RAM: units read ahead of their update, and writes in flight. The disk moves a
# block's state far slower than the CPU updates it, so one read ahead keeps the disk busy (engine/disk_reads.py).
DISK_READ_WINDOW = 1
DISK_WRITES_IN_FLIGHT = 2
DISK_GRADS_IN_FLIGHT = DISK_READ_WINDOW + DISK_WRITES_IN_FLIGHT + 1  # their gradients waiting in pinned memory
# HBM kept free, as a fraction of the block backward's working memory, so that XLA's BFC allocator finds it in one
# piece: each executable's temporaries are one allocation, made in a pool where streamed weights, swapped
# activations, gradients on their way out and GPU state come and go at other times. Evidence (H100, paper-6b, the
# planner's own plans in a 24 GiB pool, BFC dumps in experiments/results/allocator_check/): at 0.5, batch 16, 32
# and 64 failed in jit_bwd (batch 16: 4.01 GiB asked, 11.1 GiB free, largest piece 3.6 GiB); at 1.0 (and the
# blocks' squared gradient norms moved off the GPU, engine._on_grad), batch 8, 16 and 64 ran (batch 16 touched the
# pool's limit) and batch 32 (chunks=2) failed again: 5.26 GiB asked, 15.8 GiB free, pieces of at most 4.6 GiB,
# cut by gradients and activations that outlive a block. 1.5 makes batch 32 run its blocks in 4 slices (the same
# predicted step) and costs batch 8 and 16 one GPU-updated block each (+4% predicted). vmm and cuda_async, XLA's
# other allocators, are no way out: vmm crashed (segfault) and cuda_async ignores the 24 GiB cap (peak 26.8 GiB).
# The head's working memory is left out: it also counts its input and output buffers.
FRAGMENTATION_RESERVE = 1.5


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    hbm: dict[str, int]
    pinned: dict[str, int]
    host: dict[str, int]  # pageable host memory
    disk: dict[str, int] = dataclasses.field(default_factory=dict)
    pinned_pool: int = 0  # RAM XLA's pinned pool may hold on the GPU (its cap x PINNED_POOL_RSS_FACTOR); 0: CPU

    @property
    def hbm_bytes(self) -> int:
        return sum(self.hbm.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(self.pinned.values())

    @property
    def ram_bytes(self) -> int:
        """Pageable host memory plus XLA's pinned pool at its cap (at least the pinned bytes)."""
        return sum(self.host.values()) + max(self.pinned_bytes, self.pinned_pool)

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())

    def describe(self) -> str:
        rows = []
        for tier, parts in (("HBM", self.hbm), ("pinned host", self.pinned), ("pageable host", self.host),
                            ("disk", self.disk)):
            detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)
            rows.append(f"  {tier:<14} {sum(parts.values()) / GIB:8.2f} GiB  ({detail})")
        if self.pinned_pool > self.pinned_bytes:
            rows[1] += f"; XLA's pinned pool counted in RAM at {self.pinned_pool / GIB:.2f} GiB (its cap x {PINNED_POOL_RSS_FACTOR:g})"
        if self.hbm.get("fragmentation reserve"):
            rows.append(f"  {'':<14} fragmentation reserve: {FRAGMENTATION_RESERVE} x the block backward's working "
                        "memory, which XLA allocates as one contiguous block")
        return "\n".join(rows)

    def with_pinned_pool(self, limit_nbytes: int | None = None) -> MemoryEstimate:
        """This estimate on a GPU: XLA's pinned pool counted in RAM at the cap this plan's need implies
        (pinned_pool_limit_gib), or at `limit_nbytes` (XLA's actual cap) where that is lower, times
        PINNED_POOL_RSS_FACTOR."""
        cap = pinned_pool_limit_gib(self.pinned_bytes) * GIB
        if limit_nbytes is not None:
            cap = min(cap, limit_nbytes)
        return dataclasses.replace(self, pinned_pool=int(cap * PINNED_POOL_RSS_FACTOR))


def pinned_pool_limit_gib(pinned_nbytes: int) -> int:
    """The cap on XLA's pinned host pool (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, which XLA reads as whole GiB) for a
    plan that needs `pinned_nbytes` of pinned host memory: the need plus 10% plus 2 GB, rounded up."""
    return math.ceil((pinned_nbytes * (1 + PINNED_POOL_MARGIN) + PINNED_POOL_SLACK_NBYTES) / GIB)


def block_work_nbytes(chunks: int, tokens: int, d: int, f: int, itemsize: int, w_nbytes: int) -> int:
    """XLA temporaries of a block backward over `tokens` tokens in `chunks` slices."""
    work = tokens // chunks * (16 * d + 4 * f) * itemsize
    if chunks > 1:  # fp32 weight-gradient accumulator, the sliced input and the stacked input gradient
        work += 2 * w_nbytes + 2 * tokens * d * itemsize
    return work


def estimate_memory(plan: Plan, *, unit_params: list[int], compute_itemsize: int, micro_batch: int, seq_len: int,
                    d_model: int, d_ff: int, vocab_size: int, residual_nbytes: list[int], n_micro: int,
                    runtime_nbytes: int = 0, hold_grads: bool = False) -> MemoryEstimate:
    """Peak bytes per tier of one step under `plan` (units in forward order: embed, blocks, head).

    hold_grads: every host gradient waits for the global norm (clipping), instead of only a few of the units
    whose state is on disk (their updates wait on the disk, so the backward waits for a free slot).

    bf16 weights on disk are a planner-only tier (the engine refuses such plans): they are staged through
    pinned memory a few units at a time instead of resident there.
    """
    units, blocks = plan.units, plan.blocks
    w = [n * compute_itemsize for n in unit_params]
    block_w = max(w[1:-1]) if len(w) > 2 else 0
    tokens = micro_batch * seq_len
    ckpt = tokens * d_model * compute_itemsize
    cpu = [u.update_on is UpdateOn.CPU for u in units]
    state_on_disk = [u.optim_state is Tier.DISK for u in units]
    weights_on_disk = [u.weights is Tier.DISK for u in units]
    accumulate = n_micro > 1
    hbm = {
        "resident weights": sum(wi for u, wi in zip(units, w) if u.weights is Tier.HBM),
        "GPU optimizer state": sum(12 * n for n, c in zip(unit_params, cpu) if not c),
        "GPU gradient accumulators": sum(4 * n for n, c in zip(unit_params, cpu) if not c and accumulate),
        "streamed weights in flight": (plan.prefetch_depth + 1 + plan.keep_turn_blocks) * block_w,
        "block inputs kept": sum(ckpt for b in blocks if not b.activations.swap_input),
        "residuals kept": sum(r for b, r in zip(blocks, residual_nbytes) if not b.activations.swap),
        "swapped activations in flight": (plan.prefetch_depth + 1) * (ckpt + max(residual_nbytes, default=0)),
        "block backward working memory": max((block_work_nbytes(b.activations.chunks, tokens, d_model, d_ff,
                                                                compute_itemsize, wi)
                                              for b, wi in zip(blocks, w[1:-1])), default=0),
        "head working memory": 3 * min(tokens * vocab_size * 4, HEAD_CHUNK_NBYTES) + 3 * ckpt + 2 * w[0],
    }
    hbm["fragmentation reserve"] = int(FRAGMENTATION_RESERVE * hbm["block backward working memory"])
    staged = min(sum(weights_on_disk), plan.prefetch_depth + 2) * block_w
    streamed = sum(wi for wi, c, dw in zip(w, cpu, weights_on_disk) if c and not dw) + staged
    disk_grads = [wi for wi, c, ds in zip(w, cpu, state_on_disk) if c and ds]
    grads_in_flight = sum(wi for wi, c, ds in zip(w, cpu, state_on_disk) if c and not ds)
    grads_in_flight += sum(disk_grads) if hold_grads or accumulate else \
        min(len(disk_grads), DISK_GRADS_IN_FLIGHT) * max(disk_grads, default=0)
    pinned = {
        "streamed weights": streamed,
        "gradients in flight": grads_in_flight,
        "swapped block inputs": sum(ckpt for b in blocks if b.activations.swap_input),
        "swapped residuals": sum(r for b, r in zip(blocks, residual_nbytes) if b.activations.swap),
    }
    disk_state = [n for n, ds in zip(unit_params, state_on_disk) if ds]
    host = {
        "fp32 master + Adam moments": sum(12 * n for n, c, ds in zip(unit_params, cpu, state_on_disk)
                                          if c and not ds),
        # the read-ahead window (engine/disk_reads.py), the writes in flight (tiers/store.py) and one more
        # for TensorStore's chunk copies and a read issued out of turn
        "disk state staging": (DISK_READ_WINDOW + DISK_WRITES_IN_FLIGHT + 1) * 12 * max(disk_state, default=0),
        "gradient accumulators": sum(4 * n for n, c in zip(unit_params, cpu) if c and accumulate),
        "runtime": runtime_nbytes,
    }
    disk = {
        "fp32 master + Adam moments": 12 * sum(disk_state),
        "bf16 weights": sum(wi for wi, dw in zip(w, weights_on_disk) if dw),
    }
    return MemoryEstimate(hbm, pinned, host, disk)
