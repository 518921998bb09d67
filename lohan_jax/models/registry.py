"""Named model sizes: the paper's workloads, GPT-3, LLaMA-2/3 and tiny test shapes."""
from __future__ import annotations

import dataclasses
import difflib

from lohan_jax.models.spec import Activation, Arch, ModelSpec


def _gpt(name, layers, heads, hidden, vocab=50257, seq=2048, **kw):
    return ModelSpec(name=name, arch=Arch.GPT, n_layers=layers, n_heads=heads, d_model=hidden,
                     vocab_size=vocab, max_seq_len=seq, activation=Activation.GELU, **kw)


def _llama(name, layers, heads, kv_heads, hidden, ff, vocab=32000, seq=4096, theta=10000.0, eps=1e-5, **kw):
    return ModelSpec(name=name, arch=Arch.LLAMA, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                     d_model=hidden, d_ff=ff, vocab_size=vocab, max_seq_len=seq, rope_theta=theta,
                     norm_eps=eps, activation=Activation.SILU, tie_embeddings=False, **kw)


_SPECS = [
    # The paper's workloads (PAPER.md): GPT-3/OPT-like, seq 1024, vocab 50257.
    *(_gpt(f"paper-{n}", l, a, h, seq=1024) for n, l, a, h in [
        ("6b", 28, 32, 4096), ("13b", 40, 40, 5120), ("30b", 48, 56, 7168), ("70b", 80, 64, 8192),
        ("135b", 88, 88, 11264), ("175b", 96, 96, 12288), ("276b", 112, 112, 14336),
        ("412b", 128, 128, 16384)]),
    # GPT-3 (Brown et al. 2020, table 2.1).
    _gpt("gpt3-125m", 12, 12, 768), _gpt("gpt3-350m", 24, 16, 1024), _gpt("gpt3-760m", 24, 16, 1536),
    _gpt("gpt3-1.3b", 24, 32, 2048), _gpt("gpt3-2.7b", 32, 32, 2560), _gpt("gpt3-6.7b", 32, 32, 4096),
    # LLaMA-2 and LLaMA-3 (their config.json shapes).
    _llama("llama2-7b", 32, 32, 32, 4096, 11008), _llama("llama2-13b", 40, 40, 40, 5120, 13824),
    _llama("llama2-70b", 80, 64, 8, 8192, 28672),
    _llama("llama3-8b", 32, 32, 8, 4096, 14336, vocab=128256, seq=8192, theta=500000.0),
    # Tiny shapes for tests and the CPU quick start.
    ModelSpec(name="gpt-tiny", n_layers=2, d_model=32, n_heads=4, vocab_size=257, max_seq_len=256),
    ModelSpec(name="gpt-small", n_layers=4, d_model=128, n_heads=4, vocab_size=257, max_seq_len=256),
    ModelSpec(name="llama-tiny", arch=Arch.LLAMA, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
              vocab_size=257, max_seq_len=256, activation=Activation.SILU, tie_embeddings=False),
]
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str, **overrides) -> ModelSpec:
    """The named spec with fields replaced by `overrides`; unknown names suggest the closest ones."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} Known: {', '.join(REGISTRY)}")
    return dataclasses.replace(REGISTRY[name], **overrides) if overrides else REGISTRY[name]
