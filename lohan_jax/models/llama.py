"""LLaMA-style decoder units: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, untied head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lohan_jax.models.activations import swiglu
from lohan_jax.models.attention import causal_attention
from lohan_jax.models.norms import RMSNorm
from lohan_jax.models.spec import ModelSpec


def _dense(features: int, std: float, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, kernel_init=nn.initializers.normal(std), name=name)


def rotary(x_BSNH: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in Hugging Face's convention (rotate the two halves of each head), fp32 angles."""
    S, H = x_BSNH.shape[1], x_BSNH.shape[3]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    ang_SH = jnp.concatenate([jnp.outer(jnp.arange(S, dtype=jnp.float32), inv_freq)] * 2, axis=-1)
    cos, sin = jnp.cos(ang_SH).astype(x_BSNH.dtype), jnp.sin(ang_SH).astype(x_BSNH.dtype)
    x1, x2 = jnp.split(x_BSNH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BSNH * cos[None, :, None] + rotated * sin[None, :, None]


class LlamaEmbed(nn.Module):
    spec: ModelSpec
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, tokens_BS: jax.Array) -> jax.Array:
        s = self.spec
        return nn.Embed(s.vocab_size, s.d_model, embedding_init=nn.initializers.normal(s.init_std),
                        dtype=self.dtype, name="wte")(tokens_BS)


class LlamaBlock(nn.Module):
    spec: ModelSpec
    dtype: Any = jnp.bfloat16
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        s = self.spec
        B, S, D = x_BSD.shape
        out_std = s.init_std / (2 * s.n_layers) ** 0.5
        h = RMSNorm(s.norm_eps, dtype=self.dtype, name="attn_norm")(x_BSD)
        q = _dense(s.n_heads * s.head_dim, s.init_std, self.dtype, "q")(h).reshape(B, S, s.n_heads, s.head_dim)
        k = _dense(s.kv_heads * s.head_dim, s.init_std, self.dtype, "k")(h).reshape(B, S, s.kv_heads, s.head_dim)
        v = _dense(s.kv_heads * s.head_dim, s.init_std, self.dtype, "v")(h).reshape(B, S, s.kv_heads, s.head_dim)
        q = checkpoint_name(rotary(q, s.rope_theta), "q_rot")
        k = checkpoint_name(rotary(k, s.rope_theta), "k_rot")
        v = checkpoint_name(v, "v")
        ctx = checkpoint_name(causal_attention(q, k, v, self.attention_impl).reshape(B, S, D), "attn_ctx")
        x_BSD = checkpoint_name(x_BSD + _dense(D, out_std, self.dtype, "o")(ctx), "attn_res")
        h = RMSNorm(s.norm_eps, dtype=self.dtype, name="mlp_norm")(x_BSD)
        gate = checkpoint_name(_dense(s.ff_dim, s.init_std, self.dtype, "gate")(h), "mlp_gate")
        up = checkpoint_name(_dense(s.ff_dim, s.init_std, self.dtype, "up")(h), "mlp_up")
        act = checkpoint_name(swiglu(gate, up), "mlp_act")
        return x_BSD + _dense(D, out_std, self.dtype, "down")(act)


class LlamaHead(nn.Module):
    spec: ModelSpec
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BSD: jax.Array, wte_VD: jax.Array | None) -> jax.Array:
        h = RMSNorm(self.spec.norm_eps, dtype=self.dtype, name="norm")(x_BSD)
        if self.spec.tie_embeddings:
            return jnp.einsum("bsd,vd->bsv", h, wte_VD.astype(self.dtype), preferred_element_type=jnp.float32)
        w = self.param("lm_head", nn.initializers.normal(self.spec.init_std), (self.spec.d_model, self.spec.vocab_size))
        return jnp.einsum("bsd,dv->bsv", h, w.astype(self.dtype), preferred_element_type=jnp.float32)


LLAMA_ACTIVATION_NAMES = ("q_rot", "k_rot", "v", "attn_ctx", "attn_res", "mlp_gate", "mlp_up", "mlp_act")
