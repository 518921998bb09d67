"""Decoder models as per-block units, and the registry of named sizes."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from lohan_jax.models.decoder import DecoderModel, Params, cast_floating, decay_mask
from lohan_jax.models.gpt import GPT_ACTIVATION_NAMES, GPTBlock, GPTEmbed, GPTHead
from lohan_jax.models.llama import LLAMA_ACTIVATION_NAMES, LlamaBlock, LlamaEmbed, LlamaHead
from lohan_jax.models.registry import REGISTRY, get_spec
from lohan_jax.models.spec import Activation, Arch, ModelSpec


def build_model(spec: ModelSpec, dtype: Any = jnp.bfloat16, attention_impl: str | None = None) -> DecoderModel:
    """The built-in GPT or LLaMA decoder for `spec`, computing in `dtype`."""
    if spec.arch is Arch.GPT:
        units, names = (GPTEmbed, GPTBlock, GPTHead), GPT_ACTIVATION_NAMES
    else:
        units, names = (LlamaEmbed, LlamaBlock, LlamaHead), LLAMA_ACTIVATION_NAMES
    embed, block, head = units
    return DecoderModel(
        embed_module=embed(spec, dtype), block_module=block(spec, dtype, attention_impl), head_module=head(spec, dtype),
        n_layers=spec.n_layers, tied_weight=(lambda pe: pe["wte"]["embedding"]) if spec.tie_embeddings else None,
        activation_names=names, spec=spec)


__all__ = ["Activation", "Arch", "DecoderModel", "ModelSpec", "Params", "REGISTRY", "build_model", "cast_floating",
           "decay_mask", "get_spec"]
