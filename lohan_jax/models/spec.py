"""ModelSpec: the shape and flavour of a decoder, enough to build it, count it and plan it."""
from __future__ import annotations

import dataclasses
import enum


class Arch(str, enum.Enum):
    """Decoder families. GPT covers GPT-2, GPT-3 and OPT; LLAMA covers LLaMA 1-3, Mistral-like models."""

    GPT = "gpt"
    LLAMA = "llama"


class Activation(str, enum.Enum):
    GELU = "gelu"  # exact erf GELU: GPT-3 as published
    GELU_TANH = "gelu_tanh"  # GPT-2's "gelu_new"
    RELU = "relu"  # OPT
    SILU = "silu"  # LLaMA's SwiGLU gate


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's hyper-parameters.

    GPT: learned positions, pre-LayerNorm, MLP of `d_ff` with `activation`, biases, tied embedding by default.
    LLaMA: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention (`n_kv_heads`), no biases, untied head.
    """

    name: str = "custom"
    arch: Arch = Arch.GPT
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (multi-head attention)
    d_ff: int = 0  # 0 means 4 * d_model (GPT); LLaMA presets give it explicitly
    vocab_size: int = 257
    max_seq_len: int = 1024
    activation: Activation = Activation.GELU
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_theta: float = 10000.0  # LLaMA only
    pos_offset: int = 0  # GPT only: OPT's learned position table starts at index 2
    init_std: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "arch", Arch(self.arch))
        object.__setattr__(self, "activation", Activation(self.activation))
        for field in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, field) <= 0:
                raise ValueError(f"model.{field} must be positive, got {getattr(self, field)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads dividing d_model")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
                "(grouped-query attention); use 0 for plain multi-head attention")
        if self.arch is Arch.LLAMA and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.n_kv_heads and self.arch is Arch.GPT and self.n_kv_heads != self.n_heads:
            raise ValueError("model.n_kv_heads (grouped-query attention) is only supported for arch=llama")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def block_param_count(self) -> int:
        """Parameters of one transformer block, from shapes alone (matches the Flax modules; tested)."""
        d, f, h = self.d_model, self.ff_dim, self.head_dim
        if self.arch is Arch.GPT:
            return 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        kv = self.kv_heads * h
        return 2 * d + d * d + 2 * d * kv + d * d + 3 * d * f

    def embed_param_count(self) -> int:
        pos = (self.max_seq_len + self.pos_offset) * self.d_model if self.arch is Arch.GPT else 0
        return self.vocab_size * self.d_model + pos

    def head_param_count(self) -> int:
        norm = 2 * self.d_model if self.arch is Arch.GPT else self.d_model
        return norm + (0 if self.tie_embeddings else self.d_model * self.vocab_size)

    def param_count(self) -> int:
        return self.embed_param_count() + self.n_layers * self.block_param_count() + self.head_param_count()

    def nonembed_param_count(self) -> int:
        """Parameters in blocks and final norm: the N of the 6*N*tokens FLOP convention."""
        return self.n_layers * self.block_param_count() + (2 if self.arch is Arch.GPT else 1) * self.d_model
