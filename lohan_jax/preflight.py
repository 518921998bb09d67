"""Checks a run makes before it builds or allocates anything: a bad path, or a plan that does not fit the
machine's free HBM, RAM (cgroup-aware), pinned-memory limit and disk, ends in a clear error naming the key or
the numbers, instead of a traceback or the kernel's OOM killer minutes later.

The memory check uses the planner's accounting of the run's plan (lohan_jax.planner.capacity: the engine's
own formulas, from the model's shapes alone) against lohan_jax.engine.memory's budgets; the engine checks
its exact estimate again before allocating its state. Both run before the model is initialised.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lohan_jax.config import Config, ConfigError

GIB = 2**30
CPU_RUNTIME_NBYTES = GIB  # Python, jax, XLA and numba on the CPU backend (a gpt-tiny run peaks at 0.57 GiB RSS)


def check_paths(cfg: Config, run_dir: str | Path | None, resume: bool) -> None:
    """Every path the run will write or read, checked for what it must be."""
    _writable_dir(Path(run_dir) if run_dir is not None else Path(cfg.train.run_dir),
                  "--resume/--run-dir" if run_dir is not None else "train.run_dir")
    o = cfg.offload
    if o.plan_file:
        from lohan_jax.plan import Plan
        path = Path(o.plan_file)
        if not path.is_file():
            raise ConfigError(f"offload.plan_file={o.plan_file!r} does not exist (or is not a file)")
        try:
            Plan.load(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"offload.plan_file={o.plan_file!r} is not a plan this engine can run: {e}") from None
    if o.disk_path:
        _writable_dir(Path(o.disk_path), "offload.disk_path")
    if cfg.data.tokenizer != "byte" and not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} is neither 'byte' nor an existing tokenizer.json")


def _writable_dir(path: Path, key: str) -> None:
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={str(path)!r} exists and is not a directory")
    parent = next((p for p in (path, *path.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r} cannot be created: {parent} is not a writable directory")


def run_plan(cfg: Config, device=None):
    """The plan the offloaded engine will run for `cfg` on `device`: its plan file; on a GPU with offload.plan
    auto, the planner's (PlanRefused, with the smallest fixes, when nothing fits); else the uniform plan.
    `device` is jax's, or before jax starts lohan_jax.pinned_pool.GpuFacts (the same GPU, read by nvidia-smi)."""
    from lohan_jax.plan import Plan, uniform_plan

    o = cfg.offload
    if o.plan_file:
        return Plan.load(o.plan_file)
    if o.plan == "auto" and device is not None and device.platform == "gpu" and o.devices == 1:
        # the planner models the reordered disk I/O; the naive order is an engine knob for the ablation
        return dataclasses.replace(_auto_plan(cfg, device), disk_io_order=o.disk_io_order)
    return uniform_plan(cfg.model.n_layers, weights=o.weights, optim_state=o.optim_state, activations=o.activations,
                        edges_on_gpu=o.edges_on_gpu, prefetch_depth=o.prefetch_depth,
                        keep_turn_blocks=o.keep_turn_blocks, disk_io_order=o.disk_io_order)


_AUTO: dict = {}


def _auto_plan(cfg: Config, device):
    """The planner's plan, searched once per run and device: on what the plan depends on (the workload and the
    offload config, not e.g. train.compute_dtype auto once resolved), so the plan resolved before jax starts,
    from which XLA's pinned pool is capped (lohan_jax.pinned_pool), is the plan the run then runs."""
    import logging

    from lohan_jax.planner.auto import auto_plan, live_machine
    from lohan_jax.planner.cli import workload_for

    key = (workload_for(cfg), cfg.offload, device.id)
    if key not in _AUTO:
        got = auto_plan(cfg, live_machine(cfg.offload, device))
        logging.getLogger("lohan_jax").info("plan: auto\n%s", got.summary)
        _AUTO[key] = got.plan
    return _AUTO[key]


def check_memory(cfg: Config, run_dir: str | Path | None = None, device=None) -> None:
    """Refuse (MemoryBudgetError, with the numbers) a plan over the machine's free HBM, RAM, pinned limit or
    disk, including the space the run's checkpoints need (new_checkpoint_generations)."""
    import jax

    from lohan_jax.engine.memory import GIB as _GIB
    from lohan_jax.engine.memory import MemoryBudgetError, check_budgets, free_disk_bytes, machine_budgets
    from lohan_jax.planner.capacity import memory
    from lohan_jax.planner.cli import workload_for

    if cfg.offload.devices > 1:  # per-device accounting is the data-parallel engine's own
        return
    device = device or jax.devices()[0]
    plan = run_plan(cfg, device)
    est = memory(plan, workload_for(cfg))
    if device.platform == "cpu":
        est = cpu_estimate(est)
    o = cfg.offload
    # on the GPU check_budgets counts XLA's pinned pool in RAM at its cap (lohan_jax.pinned_pool sets it)
    check_budgets(est, machine_budgets(device, o.hbm_budget_gib, o.host_budget_gib, disk_path=o.disk_path))
    t = cfg.train
    ckpt_dir = Path(run_dir) if run_dir is not None else Path(t.run_dir)
    gens = new_checkpoint_generations(t, ckpt_dir / "checkpoints")
    if gens:
        linked = o.disk_path and _same_filesystem(ckpt_dir, Path(o.disk_path))  # disk state is hard-linked
        per = sum(12 * n for n, u in zip(workload_for(cfg).model.unit_params(), plan.units)
                  if not (linked and u.optim_state.value == "disk"))
        need, free = gens * per, free_disk_bytes(ckpt_dir)
        if need > free:
            raise MemoryBudgetError(
                f"the plan does not fit this machine:\n  checkpoints: {gens} of "
                f"{per / _GIB:.2f} GiB need {need / _GIB:.2f} GiB in {ckpt_dir}, {free / _GIB:.2f} GiB free. Fix: "
                "free space, fewer train.keep_checkpoints, or a run directory on a larger disk.")


def new_checkpoint_generations(t, ckpt_dir: Path) -> int:
    """How many checkpoints' worth of new disk this run needs at its peak: the saves it will make (after the
    latest committed one, when resuming), but at most keep_checkpoints + 1 alive at once (the newest is written
    before the oldest goes), less those already on disk."""
    from lohan_jax.checkpoint import committed_steps

    committed = committed_steps(ckpt_dir)
    saves = len(t.checkpoint_steps(committed[-1] if committed else 0))
    return min(saves, max(1, t.keep_checkpoints + 1 - len(committed)))


def cpu_estimate(est):
    """On the CPU backend the device's memory is host RAM too, the runtime is smaller than a CUDA one, and
    pinned memory is plain RAM (no XLA pool to count at its cap)."""
    return dataclasses.replace(est, host={**est.host, "runtime": CPU_RUNTIME_NBYTES,
                                          "device memory (the CPU backend's)": est.hbm_bytes}, pinned_pool=0)


def _same_filesystem(a: Path, b: Path) -> bool:
    exists = lambda p: next((q for q in (p.expanduser(), *p.expanduser().parents) if q.exists()), Path("/"))
    return os.stat(exists(a)).st_dev == os.stat(exists(b)).st_dev
