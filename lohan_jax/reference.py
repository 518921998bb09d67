"""The reference trainer: whole-model jax.value_and_grad + optax.adamw, everything in device memory.

It is the correctness oracle of every offloaded placement and the all-in-HBM baseline of the benchmarks,
including for non-finite steps: with the guard on, a step whose loss or gradient norm is NaN/inf keeps the
params and the optax state (so Adam's step count) as they were, inside the jitted step, exactly as the
offloaded engine skips it (lohan_jax.engine.guard).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lohan_jax.config import OptimConfig
from lohan_jax.faults import StepCheck
from lohan_jax.models import DecoderModel, Params, cast_floating, decay_mask
from lohan_jax.optim.schedule import make_optax_adamw, make_schedule


def make_reference_loss_and_grad(model: DecoderModel, compute_dtype: Any, remat: bool = False):
    """(fp32 params, step batch [M, b, S]) -> (loss, fp32 grads), accumulating micro-batches in fp32.

    remat: each block runs under jax.checkpoint and is recomputed in the backward (the engine's recompute
    policy), keeping only block inputs; the cast to compute_dtype happens inside, so no bf16 copy of the
    weights is held either. It is what lets a resident 6B step fit a 141 GB card."""
    if not remat:
        def micro_loss(params32: Params, tokens, targets, weights):
            return model.loss(cast_floating(params32, compute_dtype), tokens, targets, weights)
        return over_micro_batches(micro_loss)

    block = jax.checkpoint(lambda p32, x: model.block(cast_floating(p32, compute_dtype), x))

    def remat_loss(params32: Params, tokens, targets, weights):
        p = {k: cast_floating(params32[k], compute_dtype) for k in ("embed", "head")}
        x = model.embed(p["embed"], tokens)
        for p32 in params32["blocks"]:
            x = block(p32, x)
        return model.head_loss(p["head"], p["embed"], x, targets, weights)

    return over_micro_batches(remat_loss)


def over_micro_batches(micro_loss):
    """micro_loss(params32, tokens, targets, weights) -> loss, made a (params32, step batch [M, b, S]) -> (loss,
    fp32 grads) function that sums the micro-batches' losses and gradients in fp32 (one scan)."""
    grad_fn = jax.value_and_grad(micro_loss)

    def loss_and_grad(params32: Params, batch: dict[str, jax.Array]):
        if batch["tokens"].shape[0] == 1:  # one micro-batch: no fp32 accumulator (0 + g is g, bit for bit)
            mb = jax.tree.map(lambda a: a[0], batch)
            return grad_fn(params32, mb["tokens"], mb["targets"], mb["weights"])

        def body(carry, mb):
            loss, grads = carry
            loss_mb, g = grad_fn(params32, mb["tokens"], mb["targets"], mb["weights"])
            return (loss + loss_mb, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params32)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batch)
        return loss, grads

    return loss_and_grad


class ReferenceTrainer:
    """Holds fp32 params and optax state on the default device; `step` is one jitted optimizer step."""

    def __init__(self, model: DecoderModel, params32: Params, optim: OptimConfig, total_steps: int,
                 compute_dtype: Any = jnp.bfloat16, guard_nonfinite: bool = True, grad_fault: Any = None,
                 remat: bool = False):
        """remat: recompute each block in the backward (make_reference_loss_and_grad). guard_nonfinite: skip a
        step whose loss or gradient norm is not finite (no sync: a select inside the jitted step). grad_fault: a
        test hook `(grads, call) -> grads` applied inside the step, where `call` counts step() calls from 0
        (traced), to inject a non-finite gradient."""
        self.model, self.compute_dtype = model, compute_dtype
        self.optimizer = make_optax_adamw(optim, total_steps, decay_mask(params32))
        self.schedule = make_schedule(optim, total_steps)
        self.params = jax.tree.map(jnp.copy, params32)  # the step donates its buffers; the caller keeps theirs
        self.opt_state = self.optimizer.init(params32)
        self.defer_updates = False  # the engine's knob (replaying a torn step); the reference is never torn
        loss_and_grad = make_reference_loss_and_grad(model, compute_dtype, remat)

        def train_step(params, opt_state, count, batch, call):
            loss, grads = loss_and_grad(params, batch)
            if grad_fault is not None:
                grads = grad_fault(grads, call)
            norm = optax.tree.norm(grads)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
                updates, new_state = self.optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": norm, "lr": self.schedule(count)}
            if not guard_nonfinite:
                return new_params, new_state, count + 1, metrics
            ok = jnp.isfinite(loss) & jnp.isfinite(norm)
            keep = lambda new, old: jnp.where(ok, new, old)
            units = [grads["head"], *reversed(grads["blocks"]), grads["embed"]]  # the engine's backward order
            unit_finite = jnp.stack([jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(u)]))
                                     for u in units])
            return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, opt_state),
                    count + ok.astype(count.dtype),
                    {**metrics, "skipped": ~ok, "loss_finite": jnp.isfinite(loss), "unit_finite": unit_finite})

        self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self._eval_loss = jax.jit(lambda p, b: loss_and_grad_free(model, compute_dtype, p, b))
        self._unit_names = ["head", *(f"block{i}" for i in reversed(range(len(params32["blocks"])))), "embed"]
        self._count = jnp.zeros((), jnp.int32)  # optimizer steps applied (skipped ones do not count)
        self._calls = 0

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step; returns device scalars (read them after dispatching the next step)."""
        self.params, self.opt_state, self._count, metrics = self._train_step(
            self.params, self.opt_state, self._count, batch, jnp.int32(self._calls))
        self._calls += 1
        if "skipped" in metrics:
            metrics["nonfinite"] = StepCheck(resolver=lambda m=metrics: self._verdict(m))
        return metrics

    def _verdict(self, metrics: dict) -> tuple[bool, bool, str | None]:
        if not bool(metrics["skipped"]):
            return False, False, None
        if not bool(metrics["loss_finite"]):
            return True, False, "loss"
        bad = [n for n, f in zip(self._unit_names, np.asarray(metrics["unit_finite"])) if not f]
        return True, False, bad[0] if bad else None

    def check_nonfinite(self) -> None:
        """Nothing to check: the reference applies a step or none of it, never part of one."""

    def eval_loss(self, batch: dict[str, Any]) -> jax.Array:
        return self._eval_loss(self.params, batch)

    def master_params(self) -> Params:
        return self.params

    def state_dict(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state,
                "step": np.asarray([int(self._count)], np.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
        self._count = jnp.asarray(int(np.asarray(state["step"]).reshape(-1)[0]), jnp.int32)


def loss_and_grad_free(model: DecoderModel, compute_dtype: Any, params32: Params, batch: dict[str, jax.Array]):
    """Forward-only step-batch loss (for evaluation)."""
    p = cast_floating(params32, compute_dtype)
    losses = jax.lax.map(lambda mb: model.loss(p, mb["tokens"], mb["targets"], mb["weights"]), batch)
    return jnp.sum(losses)
