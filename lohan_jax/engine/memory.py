"""The engine's memory budgets: what the machine allows, checked against the plan's estimate
(lohan_jax.plan_memory) before anything is allocated, refusing with the numbers and what would make it fit."""
from __future__ import annotations

import dataclasses
import os

from lohan_jax.plan_memory import GIB, MemoryEstimate, estimate_memory  # noqa: F401 (re-exported)


class MemoryBudgetError(ValueError):
    """A plan needs more memory than a budget allows; the message has the numbers and the fix."""


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
    if budgets.host_bytes is not None and est.ram_bytes > budgets.host_bytes:
        problems.append(f"host RAM: needs {est.ram_bytes / GIB:.2f} GiB, {budgets.host_bytes / GIB:.2f} GiB "
                        "available. Fix: more RAM, optimizer state in HBM for some blocks, one micro-batch "
                        "(+chunks=N instead of gradient accumulation), or (when supported) a disk tier.")
    if problems:
        raise MemoryBudgetError("the plan does not fit this machine:\n  " + "\n  ".join(problems)
                                + "\nestimate:\n" + est.describe())
