"""DecoderModel: a decoder as separate units (embedding, one block, head + loss) with their own parameters.

The whole-model apply is the composition of the units, so the offloaded engine (which calls the units one by
one on per-block parameters) and the reference trainer (which differentiates the composition) compute the
same function. Any Flax modules with these call signatures can be plugged in:
  embed(tokens_BS) -> x_BSD;  block(x_BSD) -> x_BSD;  head(x_BSD, tied_VD | None) -> logits_BSV (fp32).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any  # {"embed": tree, "blocks": [tree] * n_layers, "head": tree}


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating leaf to `dtype` (the compute copy of fp32 master weights)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def decay_mask(tree: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings), not on norms and biases."""
    return jax.tree.map(lambda a: a.ndim >= 2, tree)


@dataclasses.dataclass(frozen=True)
class DecoderModel:
    """Units of a decoder and their composition. Modules are Flax linen modules (stateless descriptions)."""

    embed_module: nn.Module
    block_module: nn.Module
    head_module: nn.Module
    n_layers: int
    tied_weight: Callable[[Any], jax.Array] | None = None  # p_embed -> [V, D] when the head is tied
    activation_names: tuple[str, ...] = ()  # checkpoint_name tags inside a block (activation policy candidates)
    spec: Any = None  # the ModelSpec of built-in models; None for user models

    # ---- parameters --------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, seq_len: int = 8) -> Params:
        """fp32 parameters; block i is initialised from fold_in(rng, i) so block trees are independent."""
        units = [self.init_unit(rng, k, seq_len) for k in range(self.n_layers + 2)]
        return {"embed": units[0], "blocks": units[1:-1], "head": units[-1]}

    def init_unit(self, rng: jax.Array, k: int, seq_len: int = 8) -> Any:
        """Parameters of unit k in forward order (0 embedding, 1..L blocks, L+1 head), one at a time, so a
        model larger than any one memory can be initialised straight into its tiers."""
        with jax.numpy_dtype_promotion("standard"):  # fp32 params meet bf16 activations only at init
            return self._init_unit(rng, k, seq_len)

    def _init_unit(self, rng: jax.Array, k: int, seq_len: int) -> Any:
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        k_embed, k_head, k_blocks = jax.random.split(rng, 3)
        if k == 0:
            return self.embed_module.init(k_embed, tokens)["params"]
        p_embed = jax.eval_shape(lambda: self.embed_module.init(k_embed, tokens)["params"])
        x = jax.eval_shape(self.embed_module.apply, {"params": p_embed}, tokens)
        x = jnp.zeros(x.shape, x.dtype)
        if k <= self.n_layers:
            return self.block_module.init(jax.random.fold_in(k_blocks, k - 1), x)["params"]
        tied = None
        if self.tied_weight is not None:
            tied = jnp.zeros(jax.eval_shape(self.tied_weight, p_embed).shape, jnp.float32)
        return self.head_module.init(k_head, x, tied)["params"]

    def abstract_params(self, seq_len: int = 8) -> Params:
        """Shapes and dtypes of the parameters, without allocating them."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0), seq_len))

    def _tied(self, p_embed: Any) -> jax.Array | None:
        return self.tied_weight(p_embed) if self.tied_weight is not None else None

    # ---- units -------------------------------------------------------------------------------------------
    def embed(self, p_embed: Any, tokens_BS: jax.Array) -> jax.Array:
        return self.embed_module.apply({"params": p_embed}, tokens_BS)

    def block(self, p_block: Any, x_BSD: jax.Array) -> jax.Array:
        return self.block_module.apply({"params": p_block}, x_BSD)

    def logits(self, p_head: Any, p_embed: Any, x_BSD: jax.Array) -> jax.Array:
        return self.head_module.apply({"params": p_head}, x_BSD, self._tied(p_embed))

    def head_loss(self, p_head: Any, p_embed: Any, x_BSD: jax.Array, targets_BS: jax.Array,
                  weights_BS: jax.Array) -> jax.Array:
        """sum(weights * token NLL), fp32. Callers pass weights = mask / (valid tokens in the whole batch),
        so the sum over micro-batches is the batch-mean loss and accumulation is exact."""
        logits = self.logits(p_head, p_embed, x_BSD).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BS)
        return jnp.sum(nll * weights_BS)

    # ---- composition -------------------------------------------------------------------------------------
    def hidden(self, params: Params, tokens_BS: jax.Array) -> jax.Array:
        x = self.embed(params["embed"], tokens_BS)
        for p_block in params["blocks"]:
            x = self.block(p_block, x)
        return x

    def apply(self, params: Params, tokens_BS: jax.Array) -> jax.Array:
        """Logits of the whole model (fp32)."""
        return self.logits(params["head"], params["embed"], self.hidden(params, tokens_BS))

    def loss(self, params: Params, tokens_BS: jax.Array, targets_BS: jax.Array, weights_BS: jax.Array) -> jax.Array:
        x = self.hidden(params, tokens_BS)
        return self.head_loss(params["head"], params["embed"], x, targets_BS, weights_BS)
