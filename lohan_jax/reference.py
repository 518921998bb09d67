"""The reference trainer: whole-model jax.value_and_grad + optax.adamw, everything in device memory.

It is the correctness oracle of every offloaded placement and the all-in-HBM baseline of the benchmarks.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lohan_jax.config import OptimConfig
from lohan_jax.models import DecoderModel, Params, cast_floating, decay_mask
from lohan_jax.optim.schedule import make_optax_adamw, make_schedule


def make_reference_loss_and_grad(model: DecoderModel, compute_dtype: Any):
    """(fp32 params, step batch [M, b, S]) -> (loss, fp32 grads), accumulating micro-batches in fp32."""

    def micro_loss(params32: Params, tokens, targets, weights):
        return model.loss(cast_floating(params32, compute_dtype), tokens, targets, weights)

    grad_fn = jax.value_and_grad(micro_loss)

    def loss_and_grad(params32: Params, batch: dict[str, jax.Array]):
        def body(carry, mb):
            loss, grads = carry
            l, g = grad_fn(params32, mb["tokens"], mb["targets"], mb["weights"])
            return (loss + l, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params32)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batch)
        return loss, grads

    return loss_and_grad


class ReferenceTrainer:
    """Holds fp32 params and optax state on the default device; `step` is one jitted optimizer step."""

    def __init__(self, model: DecoderModel, params32: Params, optim: OptimConfig, total_steps: int,
                 compute_dtype: Any = jnp.bfloat16):
        self.model, self.compute_dtype = model, compute_dtype
        self.optimizer = make_optax_adamw(optim, total_steps, decay_mask(params32))
        self.schedule = make_schedule(optim, total_steps)
        self.params = jax.tree.map(jnp.copy, params32)  # the step donates its buffers; the caller keeps theirs
        self.opt_state = self.optimizer.init(params32)
        loss_and_grad = make_reference_loss_and_grad(model, compute_dtype)

        def train_step(params, opt_state, batch):
            loss, grads = loss_and_grad(params, batch)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
                updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

        self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self._eval_loss = jax.jit(lambda p, b: loss_and_grad_free(model, compute_dtype, p, b))
        self._step = 0

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step; returns device scalars (read them after dispatching the next step)."""
        lr = self.schedule(self._step)
        self.params, self.opt_state, metrics = self._train_step(self.params, self.opt_state, batch)
        self._step += 1
        return {**metrics, "lr": lr}

    def eval_loss(self, batch: dict[str, Any]) -> jax.Array:
        return self._eval_loss(self.params, batch)

    def master_params(self) -> Params:
        return self.params

    def state_dict(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state, "step": np.asarray([self._step], np.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
        self._step = int(np.asarray(state["step"]).reshape(-1)[0])


def loss_and_grad_free(model: DecoderModel, compute_dtype: Any, params32: Params, batch: dict[str, jax.Array]):
    """Forward-only step-batch loss (for evaluation)."""
    p = cast_floating(params32, compute_dtype)
    losses = jax.lax.map(lambda mb: model.loss(p, mb["tokens"], mb["targets"], mb["weights"]), batch)
    return jnp.sum(losses)
