"""Causal self-attention core shared by all decoders.

On the GPU in bf16, jax.nn.dot_product_attention (cuDNN's fused flash attention where available). Elsewhere a
plain XLA implementation with fp32 logits and softmax and explicit casts (jax's own XLA path is not clean
under strict dtype promotion in its backward pass, which our tests enforce).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp


def causal_attention(q_BSNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     implementation: str | None = None) -> jax.Array:
    """Causal attention with grouped-query support (K divides N heads); query head n uses KV head n // (N/K)."""
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, is_causal=True, implementation="cudnn")
    if implementation is None and q_BSNH.dtype != jnp.float32 and jax.default_backend() == "gpu":
        try:  # cuDNN rejects some shapes (e.g. tiny head dims) at trace time: then the XLA path below
            return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, is_causal=True, implementation="cudnn")
        except Exception as e:  # noqa: BLE001 - said once: XLA's path keeps S x S probabilities per head
            _warn_fallback_once(tuple(q_BSNH.shape), f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    return _xla_attention(q_BSNH, k_BSKH, v_BSKH)


@functools.cache
def _warn_fallback_once(shape: tuple, reason: str) -> None:
    warnings.warn(f"cuDNN attention refused q of shape {shape} ({reason}); using XLA's attention, which keeps the "
                  "attention probabilities for the backward (set train.attention=xla to silence this)", stacklevel=3)


def _xla_attention(q_BSNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array) -> jax.Array:
    B, S, N, H = q_BSNH.shape
    K = k_BSKH.shape[2]
    q_BSKGH = q_BSNH.reshape(B, S, K, N // K, H)
    logits = jnp.einsum("bskgh,btkh->bkgst", q_BSKGH, k_BSKH, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / H**0.5)
    causal_ST = jnp.tril(jnp.ones((S, S), jnp.bool_))
    logits = jnp.where(causal_ST[None, None, None], logits, jnp.float32(-1e30))
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgst,btkh->bskgh", probs, v_BSKH, preferred_element_type=jnp.float32)
    return out.astype(q_BSNH.dtype).reshape(B, S, N, H)
