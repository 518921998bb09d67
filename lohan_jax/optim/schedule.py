"""Learning-rate schedules and the optax AdamW chain: the optimizer semantics every engine reproduces."""
from __future__ import annotations

from typing import Any

import jax
import optax

from lohan_jax.config import OptimConfig, Schedule


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr as a function of the 0-based optimizer step (optax evaluates it at its state count).

    Evaluated under standard dtype promotion: optax's schedules mix Python floats with int32 counts, which
    strict promotion (our tests' setting) rejects."""
    schedule = _make_schedule(cfg, total_steps)

    def lr_at(count):
        with jax.numpy_dtype_promotion("standard"):
            return schedule(count)

    return lr_at


def _make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    if cfg.schedule is Schedule.CONSTANT:
        if cfg.warmup_steps:
            return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
        return optax.constant_schedule(cfg.lr)
    if not cfg.warmup_steps:
        return optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1), alpha=cfg.min_lr_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optax_adamw(cfg: OptimConfig, total_steps: int, decay_mask: Any) -> optax.GradientTransformation:
    """clip_by_global_norm (if asked) then optax.adamw with the weight-decay mask: the reference semantics."""
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw
