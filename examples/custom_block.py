"""Your own Flax model, trained by the offloaded engine from your own training loop.

The engine needs only three units: an embedding, one block (applied per block with that block's
parameters) and a head returning fp32 logits. Here the block is a "parallel" transformer block (GPT-J,
PaLM): attention and MLP read the same normalised input. The loop checks itself against the reference
trainer (whole-model value_and_grad + optax.adamw).

    python examples/custom_block.py --steps 20
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lohan_jax as lj
from lohan_jax.data import open_dataset
from lohan_jax.models.attention import causal_attention
from lohan_jax.models.norms import LayerNorm


class Embed(nn.Module):
    vocab: int
    d: int

    @nn.compact
    def __call__(self, tokens_BS):
        pos = self.param("pos", nn.initializers.normal(0.02), (tokens_BS.shape[1], self.d))
        return nn.Embed(self.vocab, self.d, embedding_init=nn.initializers.normal(0.02))(tokens_BS) + pos[None]


class ParallelBlock(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x_BSD):
        B, S, D = x_BSD.shape
        h = LayerNorm(dtype=x_BSD.dtype)(x_BSD)
        q, k, v = (nn.Dense(D, use_bias=False, name=n)(h).reshape(B, S, self.heads, D // self.heads) for n in "qkv")
        attn = nn.Dense(D, use_bias=False, name="o")(causal_attention(q, k, v).reshape(B, S, D))
        mlp = nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(4 * D, name="up")(h)))
        return x_BSD + attn + mlp


class Head(nn.Module):
    vocab: int

    @nn.compact
    def __call__(self, x_BSD, tied):  # `tied` is None: this head has its own output matrix
        return nn.Dense(self.vocab, use_bias=False)(LayerNorm(dtype=x_BSD.dtype)(x_BSD)).astype(jnp.float32)


def main(steps: int = 20, n_layers: int = 3, batch: int = 4, seq: int = 32) -> tuple[list[float], list[float]]:
    vocab, d = 257, 32
    model = lj.DecoderModel(embed_module=Embed(vocab, d), block_module=ParallelBlock(d, 4), head_module=Head(vocab),
                            n_layers=n_layers)
    params = model.init(jax.random.key(0), seq)
    optim = lj.OptimConfig(lr=3e-3, warmup_steps=2)
    data = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=seq, batch_size=batch, seed=0)
    plan = lj.uniform_plan(n_layers, activations="recompute")  # blocks streamed from host, AdamW on the CPU
    engine = lj.OffloadEngine(model, params, plan, optim=optim, total_steps=steps, micro_batch_shape=(batch, seq),
                              compute_dtype=jnp.float32)
    reference = lj.ReferenceTrainer(model, params, optim, steps, jnp.float32)
    losses, ref_losses = [], []
    with engine:
        for step in range(steps):
            batch_arrays = lj.step_batch(data, step, 1)
            losses.append(float(engine.step(batch_arrays)["loss"]))
            ref_losses.append(float(reference.step(batch_arrays)["loss"]))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; max relative difference from the reference "
          f"{max(abs(a - b) / b for a, b in zip(losses, ref_losses)):.2e}")
    return losses, ref_losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    np.set_printoptions(precision=4)
    main(args.steps, args.layers)
