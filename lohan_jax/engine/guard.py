"""Non-finite steps in the offloaded engine: a step whose loss or gradient norm is NaN/inf applies none of its
updates (master weights, Adam moments, disk state and Adam's step count stay as they were), and the first
offending unit is named. `train.on_nonfinite` chooses what the run does next (skip the step or stop).

Where the check sits, and what it costs when nothing goes wrong:

1. The loss, and the head's gradient (the same program computes both), are known before any update of the
   step: the engine reads them after each micro-batch's head, before the backward. A non-finite value skips
   the rest of the step, exactly. Cost: one device-to-host read per micro-batch; the GPU waits only for the
   dispatch of the first backward program, whose weights are already resident (the forward-to-backward turn).
2. Where the updates already wait for the global gradient norm (clipping), the norm is checked before the
   first of them: exact and free. With micro-batches the guard makes every step take that path (the updates
   no longer start inside the last micro-batch's backward; at most that backward's duration per step, none
   where the next forward hides the CPU AdamW), because the gradients are sums known only at the end.
3. In the fast path (one micro-batch, no clipping) block i's update runs while block i-1's backward
   computes: holding every update until the norm is known would lose that overlap on every step (the CPU
   AdamW is 1.4 s of a 1.6 s paper-6b step at batch 8). So the updates stay speculative and the step's
   gradient norm is checked afterwards, from the per-unit squared norms the backward computes anyway (when
   the step's metrics are read, and before any checkpoint is taken). A gradient that is non-finite while the
   loss is finite (in bf16/fp32 it takes an overflow inside the backward) has by then had the units above it
   updated: the step is torn, `TornStepError` is raised, nothing is saved, and the training loop reloads the
   last checkpoint and replays to that step with `engine.defer_updates` set, where 2. skips it exactly
   (deferring changes no bit of a step that is applied). No fault: no cost. A torn step: a replay of at most
   `train.checkpoint_every` steps; without a checkpoint the run stops with the error.
"""
from __future__ import annotations

import math
from typing import Any

from lohan_jax.faults import StepCheck


def finite(value: Any) -> bool:
    return math.isfinite(float(value))


def backward_order(engine: Any) -> list[Any]:
    """Units in the order their gradients appear (head, last block .. first block, embedding); the first
    non-finite one in this order is where the fault started (NaN flows down the backward)."""
    return [engine.head_u, *reversed(engine.block_us), engine.embed_u]


def first_offender(engine: Any, sq_parts: list) -> str | None:
    """The first unit, in backward order, whose squared gradient norm is not finite."""
    if engine.n_micro == 1:  # _on_grad appended one part per unit, in backward order
        values = dict(zip((u.name for u in backward_order(engine)), sq_parts))
    else:  # _finish_deferred: device units' accumulators in forward order, then the host units' sum
        device = [u for u in engine.units if not u.host_updated]
        values = dict(zip((u.name for u in device), sq_parts))
        values.update({u.name: u.sq_host for u in engine.units if u.host_updated})
    for u in backward_order(engine):
        if u.name in values and not finite(values[u.name]):
            return u.name
    return None


def skipped(engine: Any, unit: str | None) -> StepCheck:
    """Drop everything the skipped step holds (gradients, accumulators, disk reads issued ahead)."""
    for u in engine.units:
        u.held_grad = None
        if not u.host_updated:
            u.dev_acc = None
        if u.on_disk:
            engine._disk_reads.cancel(u)
    return StepCheck(skipped=True, unit=unit)


def speculative(engine: Any, sq_parts: list) -> StepCheck:
    """The verdict on a fast-path step, computed when first asked (its squared norms are device scalars)."""

    def resolve():
        total = sum(float(p) for p in sq_parts)
        return (False, False, None) if math.isfinite(total) else (False, True, first_offender(engine, sq_parts))

    return StepCheck(resolver=resolve)
