"""Causal self-attention core shared by all decoders: jax.nn.dot_product_attention (cuDNN flash on GPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_attention(q_BSNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     implementation: str | None = None) -> jax.Array:
    """Causal attention with grouped-query support (K divides N heads).

    `implementation=None` lets JAX pick cuDNN's fused kernel on GPU for bf16/fp16 and XLA elsewhere.
    """
    if implementation is None and q_BSNH.dtype == jnp.float32:
        implementation = "xla"  # cuDNN flash attention has no fp32 path
    return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, is_causal=True, implementation=implementation)
