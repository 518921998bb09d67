"""ModelSpec from a Hugging Face config.json (GPT-2, OPT, LLaMA, Mistral); features we don't implement raise."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from lohan_jax.models.spec import Activation, Arch, ModelSpec

_REQUIRED = object()

# HF ACT2FN names of the activations our GPT block implements (exactly: "gelu_fast" is another approximation).
_ACTIVATIONS = {"gelu": Activation.GELU, "gelu_new": Activation.GELU_TANH, "gelu_pytorch_tanh": Activation.GELU_TANH,
                "relu": Activation.RELU, "silu": Activation.SILU, "swish": Activation.SILU}


def _get(c: Mapping[str, Any], field: str, default: Any = _REQUIRED) -> Any:
    """`c[field]`; a missing or null field takes HF's class default, or raises when there is none."""
    if c.get(field) is not None:
        return c[field]
    if default is _REQUIRED:
        raise ValueError(f"HF {c['model_type']} config lacks the field {field!r}")
    return default


def _expect(c: Mapping[str, Any], field: str, want: Any, why: str) -> None:
    value = _get(c, field, want)
    if value != want:
        raise ValueError(f"unsupported HF {c['model_type']} config: {field}={value!r} (need {want!r}): {why}")


def _activation(c: Mapping[str, Any], field: str, default: str) -> Activation:
    name = _get(c, field, default)
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported HF {c['model_type']} config: {field}={name!r}; "
                         f"supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _name(c: Mapping[str, Any]) -> str:
    return c.get("_name_or_path") or f"hf-{c['model_type']}"


def _gpt2(c: Mapping[str, Any]) -> ModelSpec:
    _expect(c, "scale_attn_weights", True, "our attention always scales scores by 1/sqrt(head_dim)")
    _expect(c, "scale_attn_by_inverse_layer_idx", False, "per-layer score scaling is not implemented")
    _expect(c, "add_cross_attention", False, "decoder-only models have no cross-attention")
    d = _get(c, "n_embd")
    return ModelSpec(
        name=_name(c), arch=Arch.GPT, n_layers=_get(c, "n_layer"), d_model=d, n_heads=_get(c, "n_head"),
        d_ff=_get(c, "n_inner", 4 * d), vocab_size=_get(c, "vocab_size"), max_seq_len=_get(c, "n_positions"),
        activation=_activation(c, "activation_function", "gelu_new"), norm_eps=_get(c, "layer_norm_epsilon", 1e-5),
        tie_embeddings=_get(c, "tie_word_embeddings", True), init_std=_get(c, "initializer_range", 0.02))


def _opt(c: Mapping[str, Any]) -> ModelSpec:
    d = _get(c, "hidden_size")
    _expect(c, "word_embed_proj_dim", d, "project_in/project_out (OPT-350m) are not implemented; need hidden_size")
    _expect(c, "do_layer_norm_before", True, "post-LayerNorm blocks (OPT-350m) are not implemented")
    _expect(c, "_remove_final_layer_norm", False, "our GPT head always has a final LayerNorm")
    _expect(c, "enable_bias", True, "our GPT block always has biases")
    _expect(c, "layer_norm_elementwise_affine", True, "our LayerNorms always have scale and bias")
    return ModelSpec(
        name=_name(c), arch=Arch.GPT, n_layers=_get(c, "num_hidden_layers"), d_model=d,
        n_heads=_get(c, "num_attention_heads"), d_ff=_get(c, "ffn_dim"), vocab_size=_get(c, "vocab_size"),
        max_seq_len=_get(c, "max_position_embeddings"), activation=_activation(c, "activation_function", "relu"),
        norm_eps=1e-5,  # OPT's nn.LayerNorm default; the config has no field for it
        tie_embeddings=_get(c, "tie_word_embeddings", True), pos_offset=2, init_std=_get(c, "init_std", 0.02))


def _rope_theta(c: Mapping[str, Any]) -> float:
    """transformers >= 5 writes `rope_parameters`; older config.json files `rope_theta` and `rope_scaling`."""
    params = _get(c, "rope_parameters", {})
    for field, p in (("rope_parameters", params), ("rope_scaling", _get(c, "rope_scaling", {}))):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ValueError(f"unsupported HF {c['model_type']} config: {field}.rope_type={kind!r}; "
                             "only plain rotary embeddings (rope_type 'default', no rope scaling) are implemented")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"unsupported HF {c['model_type']} config: {field}.partial_rotary_factor="
                             f"{p['partial_rotary_factor']!r}; our rotary embedding covers the whole head")
    return float(params.get("rope_theta", _get(c, "rope_theta", 10000.0)))


def _llama(c: Mapping[str, Any], max_seq_len: int | None = None) -> ModelSpec:
    d, heads = _get(c, "hidden_size"), _get(c, "num_attention_heads")
    _expect(c, "hidden_act", "silu", "our LLaMA MLP is SwiGLU")
    _expect(c, "attention_bias", False, "our LLaMA attention has no biases")
    _expect(c, "mlp_bias", False, "our LLaMA MLP has no biases")
    _expect(c, "head_dim", d // heads, "our attention needs head_dim = hidden_size / num_attention_heads")
    return ModelSpec(
        name=_name(c), arch=Arch.LLAMA, n_layers=_get(c, "num_hidden_layers"), d_model=d, n_heads=heads,
        n_kv_heads=_get(c, "num_key_value_heads", heads), d_ff=_get(c, "intermediate_size"),
        vocab_size=_get(c, "vocab_size"), max_seq_len=max_seq_len or _get(c, "max_position_embeddings"),
        activation=Activation.SILU, norm_eps=_get(c, "rms_norm_eps", 1e-6),
        tie_embeddings=_get(c, "tie_word_embeddings", False), rope_theta=_rope_theta(c),
        init_std=_get(c, "initializer_range", 0.02))


def _mistral(c: Mapping[str, Any]) -> ModelSpec:
    """LLaMA's architecture and names, plus sliding-window attention. Sequences no longer than the window attend
    exactly as full causal attention does, so max_seq_len is capped at the window (train.seq_len <= max_seq_len
    is validated by Config)."""
    max_positions, window = _get(c, "max_position_embeddings"), _get(c, "sliding_window", None)
    return _llama(c, max_seq_len=min(max_positions, window) if window else max_positions)


_READERS: dict[str, Callable[[Mapping[str, Any]], ModelSpec]] = {
    "gpt2": _gpt2, "opt": _opt, "llama": _llama, "mistral": _mistral}


def spec_from_hf_config(config: Mapping[str, Any]) -> ModelSpec:
    """The ModelSpec of an HF config (a config.json dict, or a transformers config object via its to_dict()).

    Supports model_type gpt2, opt, llama and mistral; raises ValueError naming the field for other model types
    and for features our decoders don't implement (OPT-350m's projections, rope scaling, LLaMA biases, ...).
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    model_type = config.get("model_type")
    if model_type not in _READERS:
        close = difflib.get_close_matches(str(model_type), _READERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unsupported HF config model_type={model_type!r}{hint} Supported: {', '.join(_READERS)}")
    return _READERS[model_type](config)


# ---- the inverse: config.json for a spec (models trained from scratch, exported to transformers) ---------------
_ACTIVATION_NAMES = {Activation.GELU: "gelu", Activation.GELU_TANH: "gelu_new", Activation.RELU: "relu",
                     Activation.SILU: "silu"}


def hf_config_from_spec(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """A config.json dict that transformers builds `spec`'s model from: LLaMA for arch llama, GPT-2 for GPT
    specs with positions from 0, OPT for positions from 2 (the same rule as `layout_of`).

    spec_from_hf_config of the result equals `spec` up to its name (tested). Dropout is 0: we train without it.
    """
    s, act = spec, _ACTIVATION_NAMES[spec.activation]
    common = {"vocab_size": s.vocab_size, "tie_word_embeddings": s.tie_embeddings, "torch_dtype": dtype}
    if s.arch is Arch.LLAMA:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.d_model,
                "intermediate_size": s.ff_dim, "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
                "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "max_position_embeddings": s.max_seq_len,
                "rms_norm_eps": s.norm_eps, "hidden_act": act, "attention_bias": False, "mlp_bias": False,
                "attention_dropout": 0.0, "initializer_range": s.init_std, "rope_theta": s.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": s.rope_theta}, **common}
    if s.pos_offset == 0:
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": s.n_layers,
                "n_embd": s.d_model, "n_head": s.n_heads, "n_inner": s.ff_dim, "n_positions": s.max_seq_len,
                "activation_function": act, "layer_norm_epsilon": s.norm_eps, "initializer_range": s.init_std,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common,
                # GPT2Config's default bos/eos id 50256 lies outside a smaller vocabulary: say "none" instead
                **({"bos_token_id": None, "eos_token_id": None} if s.vocab_size <= 50256 else {})}
    if s.pos_offset == 2:
        if s.norm_eps != 1e-5:
            raise ValueError(f"model.norm_eps={s.norm_eps} cannot be written as an OPT config: OPT's LayerNorms "
                             "always use 1e-5")
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": s.d_model,
                "ffn_dim": s.ff_dim, "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
                "max_position_embeddings": s.max_seq_len, "word_embed_proj_dim": s.d_model,
                "do_layer_norm_before": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
                "activation_function": act, "init_std": s.init_std, "dropout": 0.0, "attention_dropout": 0.0,
                **common}
    raise ValueError(f"model.pos_offset={s.pos_offset} has no Hugging Face layout: GPT-2 uses 0, OPT uses 2")
