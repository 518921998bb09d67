"""Where each Hugging Face tensor lives in our parameter tree: one row (hf_name, path, layout) per tensor.

The table is the whole conversion. Import reads each HF tensor, applies its layout and writes it into (a slot
of) one of our leaves; export does the inverse. Rows are independent of each other, so a streaming importer
can convert a safetensors shard tensor by tensor without ever holding the whole HF state dict.

Names in the table are those of the `*ForCausalLM` class (`transformer.h.0.attn.c_attn.weight`); checkpoints
saved from the bare model class (`h.0.attn.c_attn.weight`) are accepted through `canonical_name`.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import numpy as np

from lohan_jax.models.spec import Arch, ModelSpec

Path = tuple[str | int, ...]  # a leaf of our tree, e.g. ("blocks", 3, "qkv", "kernel")


class Layout(str, enum.Enum):
    """How an HF tensor's axes relate to our leaf's."""

    SAME = "same"  # embeddings, norms, biases, and GPT-2's Conv1D weights (stored [in, out] like a Flax kernel)
    TRANSPOSE = "transpose"  # torch nn.Linear weights [out, in] <-> Flax Dense kernels [in, out]

    def to_ours(self, a_hf: np.ndarray) -> np.ndarray:
        return a_hf.T if self is Layout.TRANSPOSE else a_hf

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        return a.T if self is Layout.TRANSPOSE else a


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor: its name and shape, and where it goes in our tree.

    The tensor, after `layout`, fills slot `part` of `n_parts` equal slices of the leaf's last axis. This is how
    OPT's separate q/k/v projections fill our fused `qkv` Dense, whose output is laid out (3, n_heads, head_dim).
    """

    hf_name: str
    path: Path
    hf_shape: tuple[int, ...]
    layout: Layout = Layout.SAME
    part: int = 0
    n_parts: int = 1

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """The shape of our whole leaf (all its parts)."""
        shape = self.hf_shape[::-1] if self.layout is Layout.TRANSPOSE else self.hf_shape
        return (*shape[:-1], shape[-1] * self.n_parts)

    @property
    def slot(self) -> tuple[slice, ...]:
        """The index of this tensor's part within our leaf."""
        width = self.leaf_shape[-1] // self.n_parts
        return (*(slice(None),) * (len(self.hf_shape) - 1), slice(self.part * width, (self.part + 1) * width))


# ---- row builders: one HF module's tensors ------------------------------------------------------------------
def _norm(hf: str, path: Path, d: int, bias: bool = True) -> list[TensorMap]:
    rows = [TensorMap(f"{hf}.weight", (*path, "scale"), (d,))]
    return rows + [TensorMap(f"{hf}.bias", (*path, "bias"), (d,))] if bias else rows


def _linear(hf: str, path: Path, d_in: int, d_out: int, bias: bool, part: int = 0, n_parts: int = 1
            ) -> list[TensorMap]:
    """A torch nn.Linear (weight [out, in]) into a Flax Dense, or into part of a fused one."""
    rows = [TensorMap(f"{hf}.weight", (*path, "kernel"), (d_out, d_in), Layout.TRANSPOSE, part, n_parts)]
    return rows + [TensorMap(f"{hf}.bias", (*path, "bias"), (d_out,), Layout.SAME, part, n_parts)] if bias else rows


def _conv1d(hf: str, path: Path, d_in: int, d_out: int) -> list[TensorMap]:
    """GPT-2's Conv1D stores its weight [in, out], which is already a Flax kernel."""
    return [TensorMap(f"{hf}.weight", (*path, "kernel"), (d_in, d_out)),
            TensorMap(f"{hf}.bias", (*path, "bias"), (d_out,))]


def _lm_head(s: ModelSpec) -> list[TensorMap]:
    """The untied output projection; tied models have none (HF's `lm_head.weight` is then the embedding)."""
    if s.tie_embeddings:
        return []
    return [TensorMap("lm_head.weight", ("head", "lm_head"), (s.vocab_size, s.d_model), Layout.TRANSPOSE)]


# ---- the tables --------------------------------------------------------------------------------------------
def _gpt2_rows(s: ModelSpec) -> list[TensorMap]:
    d, f = s.d_model, s.ff_dim
    rows = [TensorMap("transformer.wte.weight", ("embed", "wte", "embedding"), (s.vocab_size, d)),
            TensorMap("transformer.wpe.weight", ("embed", "wpe", "embedding"), (s.max_seq_len, d))]
    for i in range(s.n_layers):
        h, b = f"transformer.h.{i}", ("blocks", i)
        rows += [*_norm(f"{h}.ln_1", (*b, "ln_1"), d),
                 *_conv1d(f"{h}.attn.c_attn", (*b, "qkv"), d, 3 * d),  # [D, 3D], q|k|v each (n_heads, head_dim)
                 *_conv1d(f"{h}.attn.c_proj", (*b, "out"), d, d),
                 *_norm(f"{h}.ln_2", (*b, "ln_2"), d),
                 *_conv1d(f"{h}.mlp.c_fc", (*b, "fc"), d, f),
                 *_conv1d(f"{h}.mlp.c_proj", (*b, "proj"), f, d)]
    return rows + _norm("transformer.ln_f", ("head", "ln_f"), d) + _lm_head(s)


def _opt_rows(s: ModelSpec) -> list[TensorMap]:
    d, f, p = s.d_model, s.ff_dim, "model.decoder"
    rows = [TensorMap(f"{p}.embed_tokens.weight", ("embed", "wte", "embedding"), (s.vocab_size, d)),
            # OPT's table keeps the 2 offset rows it never reads; so does ours (wpe has max_seq_len + pos_offset rows)
            TensorMap(f"{p}.embed_positions.weight", ("embed", "wpe", "embedding"), (s.max_seq_len + s.pos_offset, d))]
    for i in range(s.n_layers):
        h, b = f"{p}.layers.{i}", ("blocks", i)
        rows += _norm(f"{h}.self_attn_layer_norm", (*b, "ln_1"), d)
        for j, name in enumerate("qkv"):
            rows += _linear(f"{h}.self_attn.{name}_proj", (*b, "qkv"), d, d, bias=True, part=j, n_parts=3)
        rows += [*_linear(f"{h}.self_attn.out_proj", (*b, "out"), d, d, bias=True),
                 *_norm(f"{h}.final_layer_norm", (*b, "ln_2"), d),
                 *_linear(f"{h}.fc1", (*b, "fc"), d, f, bias=True),
                 *_linear(f"{h}.fc2", (*b, "proj"), f, d, bias=True)]
    return rows + _norm(f"{p}.final_layer_norm", ("head", "ln_f"), d) + _lm_head(s)


def _llama_rows(s: ModelSpec) -> list[TensorMap]:
    d, f, q, kv = s.d_model, s.ff_dim, s.n_heads * s.head_dim, s.kv_heads * s.head_dim
    rows = [TensorMap("model.embed_tokens.weight", ("embed", "wte", "embedding"), (s.vocab_size, d))]
    for i in range(s.n_layers):
        h, b = f"model.layers.{i}", ("blocks", i)
        rows += [*_norm(f"{h}.input_layernorm", (*b, "attn_norm"), d, bias=False),
                 *_linear(f"{h}.self_attn.q_proj", (*b, "q"), d, q, bias=False),
                 *_linear(f"{h}.self_attn.k_proj", (*b, "k"), d, kv, bias=False),
                 *_linear(f"{h}.self_attn.v_proj", (*b, "v"), d, kv, bias=False),
                 *_linear(f"{h}.self_attn.o_proj", (*b, "o"), q, d, bias=False),
                 *_norm(f"{h}.post_attention_layernorm", (*b, "mlp_norm"), d, bias=False),
                 *_linear(f"{h}.mlp.gate_proj", (*b, "gate"), d, f, bias=False),
                 *_linear(f"{h}.mlp.up_proj", (*b, "up"), d, f, bias=False),
                 *_linear(f"{h}.mlp.down_proj", (*b, "down"), f, d, bias=False)]
    return rows + _norm("model.norm", ("head", "norm"), d, bias=False) + _lm_head(s)


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """The tensor names of one HF model class family."""

    model_type: str  # the HF model_type whose names `rows` uses
    prefix: str  # the base model's prefix inside the *ForCausalLM class, e.g. "transformer."
    bare_prefixes: tuple[str, ...]  # prefixes of the same names saved from smaller classes, longest first
    rows: Callable[[ModelSpec], list[TensorMap]]
    buffer_suffixes: tuple[str, ...] = ()  # non-parameter buffers some checkpoints carry; skipped on import

    def canonical_name(self, name: str) -> str:
        """`name` as the *ForCausalLM class spells it (`h.0.ln_1.weight` -> `transformer.h.0.ln_1.weight`)."""
        if name.startswith(self.prefix) or name.startswith("lm_head."):
            return name
        bare = next(p for p in self.bare_prefixes if name.startswith(p))
        return self.prefix + name[len(bare):]

    def is_skipped(self, spec: ModelSpec, canonical: str) -> bool:
        """Tensors import ignores: buffers, and a tied model's `lm_head.weight` (HF ties it to the embedding)."""
        return canonical.endswith(self.buffer_suffixes) or (spec.tie_embeddings and canonical == "lm_head.weight")


LAYOUTS: dict[str, HFLayout] = {
    "gpt2": HFLayout("gpt2", "transformer.", ("",), _gpt2_rows,
                     buffer_suffixes=(".attn.bias", ".attn.masked_bias")),  # causal-mask buffers of old checkpoints
    "opt": HFLayout("opt", "model.decoder.", ("decoder.", ""), _opt_rows),
    "llama": HFLayout("llama", "model.", ("",), _llama_rows, buffer_suffixes=(".rotary_emb.inv_freq",)),
}


def layout_of(spec: ModelSpec) -> HFLayout:
    """The HF layout of a spec. GPT specs are OPT when their positions start at 2 (OPT's fixed offset), GPT-2
    when they start at 0; LLaMA specs use LLaMA's names (which Mistral shares)."""
    if spec.arch is Arch.LLAMA:
        return LAYOUTS["llama"]
    if spec.pos_offset in (0, 2):
        return LAYOUTS["gpt2" if spec.pos_offset == 0 else "opt"]
    raise ValueError(f"model.pos_offset={spec.pos_offset} has no Hugging Face layout: GPT-2 uses 0, OPT uses 2")


def tensor_table(spec: ModelSpec) -> list[TensorMap]:
    """Every HF tensor of `spec`'s model, with its place in our parameter tree."""
    return layout_of(spec).rows(spec)
