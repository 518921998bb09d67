"""Memory accounting of a plan before anything is allocated: HBM, pinned host and pageable host bytes.

The engine refuses a plan whose estimate exceeds a budget, with the numbers and what would make it fit.
The block backward's working memory is an estimate calibrated on the GPU machine: a recomputed GPT block
(paper-6b, 64 x 1024 tokens) needed 15.64 GiB of XLA temporaries, i.e. (16*D + 4*F) * 2 bytes per token.
"""
from __future__ import annotations

import dataclasses
import os

from lohan_jax.plan import Plan, Tier, UpdateOn

GIB = 2**30


class MemoryBudgetError(ValueError):
    """A plan needs more memory than a budget allows; the message has the numbers and the fix."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    hbm: dict[str, int]
    pinned: dict[str, int]
    host: dict[str, int]

    @property
    def hbm_bytes(self) -> int:
        return sum(self.hbm.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(self.pinned.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values()) + self.pinned_bytes

    def describe(self) -> str:
        rows = []
        for tier, parts in (("HBM", self.hbm), ("pinned host", self.pinned), ("pageable host", self.host)):
            detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)
            rows.append(f"  {tier:<14} {sum(parts.values()) / GIB:8.2f} GiB  ({detail})")
        return "\n".join(rows)


def estimate_memory(plan: Plan, *, unit_params: list[int], compute_itemsize: int, micro_batch: int, seq_len: int,
                    d_model: int, d_ff: int, vocab_size: int, residual_nbytes: list[int], n_micro: int,
                    head_chunk_bytes: int = GIB) -> MemoryEstimate:
    """Peak bytes per tier of one step under `plan` (units in forward order: embed, blocks, head)."""
    units, blocks = plan.units, plan.blocks
    w = [n * compute_itemsize for n in unit_params]
    block_w = max(w[1:-1]) if len(w) > 2 else 0
    tokens = micro_batch * seq_len
    ckpt = tokens * d_model * compute_itemsize
    hbm = {
        "resident weights": sum(wi for u, wi in zip(units, w) if u.weights is Tier.HBM),
        "GPU optimizer state": sum(12 * n for u, n in zip(units, unit_params) if u.update_on is UpdateOn.GPU),
        "GPU gradient accumulators": sum(4 * n for u, n in zip(units, unit_params)
                                         if u.update_on is UpdateOn.GPU and n_micro > 1),
        "streamed weights in flight": (plan.prefetch_depth + 1 + plan.keep_turn_blocks) * block_w,
        "block inputs kept": sum(ckpt for b in blocks if not b.activations.swap_input),
        "residuals kept": sum(r for b, r in zip(blocks, residual_nbytes) if not b.activations.swap),
        "swapped activations in flight": (plan.prefetch_depth + 1) * (ckpt + max(residual_nbytes, default=0)),
        "block backward working memory": max(_block_work(b.activations.chunks, tokens, d_model, d_ff, compute_itemsize,
                                                         wi) for b, wi in zip(blocks, w[1:-1])) if blocks else 0,
        "head working memory": 3 * min(tokens * vocab_size * 4, head_chunk_bytes) + 3 * ckpt + 2 * w[0],
    }
    pinned = {
        "streamed weights": sum(wi for u, wi in zip(units, w) if u.update_on is UpdateOn.CPU),
        "gradients in flight": sum(wi for u, wi in zip(units, w) if u.update_on is UpdateOn.CPU),
        "swapped block inputs": sum(ckpt for b in blocks if b.activations.swap_input),
        "swapped residuals": sum(r for b, r in zip(blocks, residual_nbytes) if b.activations.swap),
    }
    on_disk = [n for u, n in zip(units, unit_params) if u.optim_state is Tier.DISK]
    host = {
        "fp32 master + Adam moments": sum(12 * n for u, n in zip(units, unit_params)
                                          if u.update_on is UpdateOn.CPU and u.optim_state is Tier.HOST),
        # reads in flight (prefetch_depth + 1) and writes in flight (2, each with TensorStore's encoded copy)
        "disk state staging": (plan.prefetch_depth + 5) * 12 * max(on_disk, default=0),
        "gradient accumulators": sum(4 * n for u, n in zip(units, unit_params)
                                     if u.update_on is UpdateOn.CPU and n_micro > 1),
    }
    return MemoryEstimate(hbm, pinned, host)


def _block_work(chunks: int, tokens: int, d: int, f: int, itemsize: int, w_bytes: int) -> int:
    work = tokens // chunks * (16 * d + 4 * f) * itemsize
    if chunks > 1:  # fp32 weight-gradient accumulator, the sliced input and the stacked input gradient
        work += 2 * w_bytes + 2 * tokens * d * itemsize
    return work


@dataclasses.dataclass(frozen=True)
class Budgets:
    hbm_bytes: int | None
    pinned_bytes: int | None
    host_bytes: int | None


def machine_budgets(device, hbm_gib: float = 0.0, host_gib: float = 0.0, margin: float = 0.05) -> Budgets:
    """Budgets from the config, else from what the machine reports (minus a margin)."""
    hbm = int(hbm_gib * GIB) if hbm_gib else None
    if hbm is None and device.platform == "gpu":
        stats = device.memory_stats() or {}
        hbm = stats.get("bytes_limit")
    host = int(host_gib * GIB) if host_gib else available_ram_bytes()
    pinned = None
    if device.platform == "gpu":
        pinned = int(float(os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "64")) * 1e9)
    scale = lambda b: None if b is None else int(b * (1 - margin))
    return Budgets(scale(hbm), scale(pinned), scale(host))


def available_ram_bytes() -> int | None:
    """MemAvailable, capped by the cgroup's limit (containers report the host's RAM in /proc/meminfo)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            avail = min(avail, int(text)) if avail else int(text)
    return avail


def check_budgets(est: MemoryEstimate, budgets: Budgets) -> None:
    problems = []
    if budgets.hbm_bytes is not None and est.hbm_bytes > budgets.hbm_bytes:
        problems.append(f"HBM: needs {est.hbm_bytes / GIB:.2f} GiB, budget {budgets.hbm_bytes / GIB:.2f} GiB. "
                        "Fix: stream more blocks from host (offload.weights=host, optim_state=host), swap block "
                        "inputs (+swap_input), recompute (+chunks=N for large batches), or a smaller batch.")
    if budgets.pinned_bytes is not None and est.pinned_bytes > budgets.pinned_bytes:
        problems.append(f"pinned host memory: needs {est.pinned_bytes / GIB:.2f} GiB, XLA's limit is "
                        f"{budgets.pinned_bytes / GIB:.2f} GiB. Fix: raise XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB "
                        "before jax starts, or keep more state in HBM.")
    if budgets.host_bytes is not None and est.host_bytes > budgets.host_bytes:
        problems.append(f"host RAM: needs {est.host_bytes / GIB:.2f} GiB, {budgets.host_bytes / GIB:.2f} GiB "
                        "available. Fix: more RAM, optimizer state in HBM for some blocks, one micro-batch "
                        "(+chunks=N instead of gradient accumulation), or (when supported) a disk tier.")
    if problems:
        raise MemoryBudgetError("the plan does not fit this machine:\n  " + "\n  ".join(problems)
                                + "\nestimate:\n" + est.describe())
