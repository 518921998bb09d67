"""Baseline trainers measured beside lohan_jax, behind one registry so a benchmark selects them by name.

    trainer = make_trainer("jax_native_offload", model, optim, total_steps, batch_shape=(M, b, S))
    metrics = trainer.step(step_batch(data, step, M))      # ReferenceTrainer's interface

The DeepSpeed baselines are PyTorch programs, not trainers of this package: experiments/baselines/deepspeed_gpt.py.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from lohan_jax.config import OptimConfig
from lohan_jax.models import DecoderModel


def _jax_native_offload(model, optim, total_steps, *, batch_shape, compute_dtype, seed):
    from lohan_jax.baselines.jax_native_offload import JaxNativeOffloadTrainer, init_params_by_unit

    seq_len = batch_shape[-1] if batch_shape else 8
    return JaxNativeOffloadTrainer(model, init_params_by_unit(model, seed, seq_len), optim, total_steps, compute_dtype,
                                   batch_shape=batch_shape, seq_len=seq_len)


# name -> factory(model, optim, total_steps, *, batch_shape, compute_dtype, seed) -> trainer
SYSTEMS: dict[str, Callable[..., Any]] = {"jax_native_offload": _jax_native_offload}


def make_trainer(system: str, model: DecoderModel, optim: OptimConfig, total_steps: int, *,
                 batch_shape: tuple[int, int, int] | None = None, compute_dtype: Any = jnp.bfloat16,
                 seed: int = 0) -> Any:
    """The baseline trainer `system`, its fp32 parameters those of `model.init(jax.random.key(seed))` (the
    reference benchmark's), initialised one unit at a time. `batch_shape` = [micro-batches, batch, seq]: the
    step is compiled ahead and refused before allocating if it cannot fit (a MemoryError naming the numbers)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown baseline system {system!r}; known: {', '.join(SYSTEMS)}")
    return SYSTEMS[system](model, optim, total_steps, batch_shape=batch_shape, compute_dtype=compute_dtype, seed=seed)


__all__ = ["SYSTEMS", "make_trainer"]
