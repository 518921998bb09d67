"""MLP activations with hand-written backward passes (jax.custom_vjp) that keep only their inputs.

Autodiff of exact GELU keeps erf's and exp's intermediates beside the input: two more tensors of the MLP's
width per token (a quarter of a GPT block's kept bytes). Here the backward recomputes the derivative from the
input alone. Forwards are jax.nn's, so outputs are unchanged; derivatives are computed in fp32.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lohan_jax.models.spec import Activation

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_grad(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0)))) + x * jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_tanh_grad(x: jax.Array) -> jax.Array:
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def _silu_grad(x: jax.Array) -> jax.Array:
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


_FNS: dict[Activation, tuple[Callable, Callable]] = {
    Activation.GELU: (lambda x: jax.nn.gelu(x, approximate=False), _gelu_grad),
    Activation.GELU_TANH: (lambda x: jax.nn.gelu(x, approximate=True), _gelu_tanh_grad),
    Activation.RELU: (jax.nn.relu, lambda x: (x > 0).astype(x.dtype)),
    Activation.SILU: (jax.nn.silu, _silu_grad),
}


def pointwise(kind: Activation) -> Callable[[jax.Array], jax.Array]:
    """The activation `kind`, whose backward keeps only its input."""
    fn, grad = _FNS[Activation(kind)]

    @jax.custom_vjp
    def act(x):
        return fn(x)

    def act_bwd(x, g):
        return ((g.astype(jnp.float32) * grad(x.astype(jnp.float32))).astype(x.dtype),)

    act.defvjp(lambda x: (fn(x), x), act_bwd)
    return act


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, keeping only gate and up for the backward."""
    return jax.nn.silu(gate) * up


def _swiglu_bwd(res, g):
    gate, up = res
    g32, gate32 = g.astype(jnp.float32), gate.astype(jnp.float32)
    dgate = g32 * up.astype(jnp.float32) * _silu_grad(gate32)
    return dgate.astype(gate.dtype), (g32 * jax.nn.silu(gate32)).astype(up.dtype)


swiglu.defvjp(lambda gate, up: (swiglu(gate, up), (gate, up)), _swiglu_bwd)
