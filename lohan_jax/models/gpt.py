"""GPT-2/GPT-3/OPT decoder units: learned positions, pre-LayerNorm blocks, GELU/ReLU MLP, tied embedding."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lohan_jax.models.activations import pointwise
from lohan_jax.models.attention import causal_attention
from lohan_jax.models.norms import LayerNorm
from lohan_jax.models.spec import Activation, ModelSpec

_ACT = {a: pointwise(a) for a in Activation}


def _dense(features: int, std: float, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(std), name=name)


class GPTEmbed(nn.Module):
    """Token plus learned position embedding."""

    spec: ModelSpec
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, tokens_BS: jax.Array) -> jax.Array:
        s = self.spec
        init = nn.initializers.normal(s.init_std)
        wte = nn.Embed(s.vocab_size, s.d_model, embedding_init=init, dtype=self.dtype, name="wte")
        wpe = nn.Embed(s.max_seq_len + s.pos_offset, s.d_model, embedding_init=init, dtype=self.dtype, name="wpe")
        pos_S = jnp.arange(tokens_BS.shape[1]) + s.pos_offset
        return wte(tokens_BS) + wpe(pos_S)[None]


class GPTBlock(nn.Module):
    """One pre-LN transformer block; named intermediates are the activation-policy candidates."""

    spec: ModelSpec
    dtype: Any = jnp.bfloat16
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        s = self.spec
        B, S, D = x_BSD.shape
        out_std = s.init_std / (2 * s.n_layers) ** 0.5  # GPT-2's scaled init of residual projections
        h = LayerNorm(s.norm_eps, dtype=self.dtype, name="ln_1")(x_BSD)
        qkv = checkpoint_name(_dense(3 * D, s.init_std, self.dtype, "qkv")(h), "qkv")
        q, k, v = jnp.split(qkv.reshape(B, S, 3, s.n_heads, s.head_dim), 3, axis=2)
        ctx = causal_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.attention_impl)
        ctx = checkpoint_name(ctx.reshape(B, S, D), "attn_ctx")
        x_BSD = checkpoint_name(x_BSD + _dense(D, out_std, self.dtype, "out")(ctx), "attn_res")
        h = LayerNorm(s.norm_eps, dtype=self.dtype, name="ln_2")(x_BSD)
        up = checkpoint_name(_dense(s.ff_dim, s.init_std, self.dtype, "fc")(h), "mlp_up")
        act = checkpoint_name(_ACT[s.activation](up), "mlp_act")
        return x_BSD + _dense(D, out_std, self.dtype, "proj")(act)


class GPTHead(nn.Module):
    """Final LayerNorm and the output projection (the tied token embedding unless untied)."""

    spec: ModelSpec
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BSD: jax.Array, wte_VD: jax.Array | None) -> jax.Array:
        h = LayerNorm(self.spec.norm_eps, dtype=self.dtype, name="ln_f")(x_BSD)
        if self.spec.tie_embeddings:
            return jnp.einsum("bsd,vd->bsv", h, wte_VD.astype(self.dtype), preferred_element_type=jnp.float32)
        w = self.param("lm_head", nn.initializers.normal(self.spec.init_std), (self.spec.d_model, self.spec.vocab_size))
        return jnp.einsum("bsd,dv->bsv", h, w.astype(self.dtype), preferred_element_type=jnp.float32)


GPT_ACTIVATION_NAMES = ("qkv", "attn_ctx", "attn_res", "mlp_up", "mlp_act")
