"""The engine's memory budgets: what the machine allows, checked against the plan's estimate
(lohan_jax.plan_memory) before anything is allocated, refusing with the numbers and what would make it fit.

Free RAM is MemAvailable capped by the cgroup's limit minus what the cgroup already uses (a container's
/proc/meminfo reports the host's RAM; the OOM killer acts on the cgroup): cgroup v2 memory.max/current, v1
memory.limit_in_bytes/usage_in_bytes, at the root and at this process's own cgroup, page cache that can be
reclaimed (inactive_file) counted as free. Pinned host memory is XLA's limit on the GPU, and RAM counts XLA's pinned
pool at its cap (MemoryEstimate.with_pinned_pool). Disk is the free space where the plan keeps state."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from lohan_jax.plan_memory import (  # noqa: F401 (GIB, MemoryEstimate, estimate_memory: re-exported)
    GIB,
    PINNED_LIMIT_ENV,
    PINNED_POOL_RSS_FACTOR,
    MemoryEstimate,
    estimate_memory,
    pinned_pool_limit_gib,
)


class MemoryBudgetError(ValueError):
    """A plan needs more memory than a budget allows; the message has the numbers and the fix."""


@dataclasses.dataclass(frozen=True)
class Budgets:
    hbm_bytes: int | None
    pinned_bytes: int | None
    host_bytes: int | None
    disk_bytes: int | None = None  # free space where the plan keeps optimizer state (None: not checked)
    disk_path: str = ""
    pinned_limit_bytes: int | None = None  # XLA's cap on its pinned pool, without the margin (None: no pool, CPU)


# Where the kernel reports memory (tests point these at fakes).
PROC_MEMINFO = "/proc/meminfo"
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"


def machine_budgets(device, hbm_gib: float = 0.0, host_gib: float = 0.0, margin: float = 0.05,
                    disk_path: str = "") -> Budgets:
    """Budgets from the config, else from what the machine reports (minus a margin)."""
    hbm = int(hbm_gib * GIB) if hbm_gib else None
    if hbm is None and device.platform == "gpu":
        stats = device.memory_stats() or {}
        hbm = stats.get("bytes_limit")
        if hbm is not None:  # another process (or an earlier engine) may hold part of it
            hbm -= stats.get("bytes_in_use", 0)
    host = available_ram_bytes()
    if host_gib:
        host = int(host_gib * GIB) if host is None else min(host, int(host_gib * GIB))
    pinned = pinned_limit_nbytes() if device.platform == "gpu" else None
    disk = free_disk_bytes(disk_path) if disk_path else None
    scale = lambda b: None if b is None else int(b * (1 - margin))
    return Budgets(scale(hbm), scale(pinned), scale(host), scale(disk), disk_path, pinned)


def pinned_limit_nbytes() -> int:
    """XLA's cap on its pinned host pool: the environment's, else XLA's default of 64 (GiB, as XLA reads it)."""
    return int(float(os.environ.get(PINNED_LIMIT_ENV, "64")) * GIB)


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `path`."""
    path = Path(path).expanduser()
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(probe).free


def available_ram_bytes() -> int | None:
    """MemAvailable, capped by what the cgroup still allows (its limit minus its non-reclaimable usage)."""
    avail = None
    for line in _read(PROC_MEMINFO).splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    for left in _cgroup_room():
        avail = left if avail is None else min(avail, left)
    return avail


def _cgroup_room() -> list[int]:
    """Bytes each memory cgroup limiting this process still allows."""
    dirs = {Path(CGROUP_ROOT), Path(CGROUP_ROOT) / "memory"}
    for line in _read(PROC_SELF_CGROUP).splitlines():  # "0::/path" (v2) or "N:memory:/path" (v1)
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2].strip("/") and (parts[1] in ("", "memory") or "memory" in parts[1].split(",")):
            base = Path(CGROUP_ROOT) / ("memory" if parts[1] else "")
            dirs.add(base / parts[2].strip("/"))
    room = []
    for d in sorted(dirs):
        for limit_f, usage_f, inactive_key in (("memory.max", "memory.current", "inactive_file"),
                                               ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                "total_inactive_file")):
            limit = _read(d / limit_f).strip()
            if not limit.isdigit() or int(limit) >= 1 << 60:
                continue
            usage = _read(d / usage_f).strip()
            used = int(usage) if usage.isdigit() else 0
            for line in _read(d / "memory.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key and value.strip().isdigit():
                    used -= int(value)
            room.append(max(0, int(limit) - max(0, used)))
    return room


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def check_budgets(est: MemoryEstimate, budgets: Budgets) -> None:
    if budgets.pinned_limit_bytes is not None:  # on the GPU: RAM counts XLA's pinned pool at its cap
        est = est.with_pinned_pool(budgets.pinned_limit_bytes)
    problems = []
    if budgets.hbm_bytes is not None and est.hbm_bytes > budgets.hbm_bytes:
        problems.append(f"HBM: needs {est.hbm_bytes / GIB:.2f} GiB, budget {budgets.hbm_bytes / GIB:.2f} GiB. "
                        "Fix: stream more blocks from host (offload.weights=host, optim_state=host), swap block "
                        "inputs (+swap_input), recompute (+chunks=N for large batches), or a smaller batch.")
    if budgets.pinned_bytes is not None and est.pinned_bytes > budgets.pinned_bytes:
        problems.append(f"pinned host memory: needs {est.pinned_bytes / GIB:.2f} GiB, XLA's limit is "
                        f"{budgets.pinned_bytes / GIB:.2f} GiB (after a 5% margin). Fix: raise {PINNED_LIMIT_ENV} to "
                        f"{pinned_pool_limit_gib(est.pinned_bytes)} before jax starts (or unset it: `lohan-jax train` "
                        "caps it at the plan's pinned need + 10% + 2 GB), or shrink the plan's pinned need (a "
                        "smaller batch, fewer swapped activations, more weights in HBM).")
    if budgets.host_bytes is not None and est.ram_bytes > budgets.host_bytes:
        pool = (f" (XLA's pinned pool counted at its cap x {PINNED_POOL_RSS_FACTOR:g}, {est.pinned_pool / GIB:.2f} GiB)"
                if est.pinned_pool > est.pinned_bytes else "")
        problems.append(f"host RAM: needs {est.ram_bytes / GIB:.2f} GiB{pool}, {budgets.host_bytes / GIB:.2f} GiB "
                        "available. Fix: more RAM, optimizer state in HBM for some blocks, one micro-batch "
                        "(+chunks=N instead of gradient accumulation), or optimizer state on disk "
                        "(offload.optim_state=disk).")
    if budgets.disk_bytes is not None and est.disk_bytes > budgets.disk_bytes:
        problems.append(f"disk at {budgets.disk_path}: needs {est.disk_bytes / GIB:.2f} GiB, "
                        f"{budgets.disk_bytes / GIB:.2f} GiB free. Fix: free space, another offload.disk_path, or "
                        "keep more optimizer state in host memory or HBM.")
    if problems:
        raise MemoryBudgetError("the plan does not fit this machine:\n  " + "\n  ".join(problems)
                                + "\nestimate:\n" + est.describe())
