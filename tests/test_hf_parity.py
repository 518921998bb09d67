"""Tests of lohan_jax.hf: logits equal Hugging Face transformers' on the same weights (GPT-2, OPT, LLaMA with
grouped-query attention, Mistral), weights round-trip exactly, and bad inputs raise errors naming the culprit."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lohan_jax.hf import params_from_hf, params_to_hf, spec_from_hf_config, tensor_table  # noqa: E402
from lohan_jax.models import build_model  # noqa: E402

VOCAB, SEQ = 101, 16
_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)  # ids inside the tiny vocabulary

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ + 8,
                                            **_TOKENS),
    "gpt2-untied": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=48, vocab_size=VOCAB,
                                                   n_positions=SEQ, tie_word_embeddings=False, **_TOKENS),
    "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                          vocab_size=VOCAB, max_position_embeddings=SEQ + 4, word_embed_proj_dim=32,
                                          **_TOKENS),
    "llama-gqa": lambda: transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                                                  num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
                                                  max_position_embeddings=64, rms_norm_eps=1e-5,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                                  **_TOKENS),
    "llama-tied": lambda: transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                   intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                                                   tie_word_embeddings=True, **_TOKENS),
    "mistral": lambda: transformers.MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                  num_key_value_heads=1, head_dim=8, intermediate_size=48,
                                                  vocab_size=VOCAB, max_position_embeddings=256, sliding_window=SEQ,
                                                  **_TOKENS),
}
PREFIXES = {"gpt2": "transformer.", "opt": "model.decoder.", "llama": "model.", "mistral": "model."}


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf(request):
    """(name, config dict, torch model, its parameters as numpy, logits on fixed tokens)."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1 and 0 otherwise: perturb them so layouts matter
            p.add_(0.1 * torch.randn_like(p))
        tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ), dtype=np.int32)
        logits = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    named = {k: v.detach().numpy() for k, v in model.named_parameters()}
    return request.param, config.to_dict(), model, named, tokens, logits


def test_logits_match_transformers(hf):
    name, config, model, _, tokens, logits_hf = hf
    spec = spec_from_hf_config(config)
    params = params_from_hf(spec, {k: v.numpy() for k, v in model.state_dict().items()})
    ours = build_model(spec, jnp.float32)
    abstract = ours.abstract_params()
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, params, abstract))
    with jax.default_matmul_precision("highest"):  # fp32 dots stay fp32 even where TF32 is the default (GPU)
        logits = np.asarray(jax.jit(ours.apply)(params, jnp.asarray(tokens)))
    assert logits.shape == logits_hf.shape
    np.testing.assert_array_less(np.abs(logits - logits_hf).max(), 1e-4, err_msg=name)


def test_round_trip_is_exact(hf):
    _, config, _, named, _, _ = hf
    spec = spec_from_hf_config(config)
    back = params_to_hf(spec, params_from_hf(spec, named))
    assert list(back) == [row.hf_name for row in tensor_table(spec)]
    assert set(back) == set(named)  # named_parameters() lists a tied lm_head once, under the embedding
    for k, v in named.items():
        assert back[k].dtype == np.float32 and back[k].flags.c_contiguous
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_names_without_task_prefix_and_buffers(hf):
    name, config, _, named, _, _ = hf
    spec = spec_from_hf_config(config)
    prefix = PREFIXES[config["model_type"]]
    bare = {k.removeprefix(prefix): v for k, v in named.items()}
    assert any(k != b for k, b in zip(named, bare, strict=True))
    if config["model_type"] == "opt":  # OPTModel's names keep "decoder."
        bare = {("decoder." + k if not k.startswith("lm_head.") else k): v for k, v in bare.items()}
    if config["model_type"] == "gpt2":  # the causal-mask buffer old GPT-2 checkpoints carry
        bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, SEQ, SEQ), np.float32))
    expected, got = params_from_hf(spec, named), params_from_hf(spec, bare)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def _llama_case():
    config = CONFIGS["llama-gqa"]()
    spec = spec_from_hf_config(config.to_dict())
    named = {k: v.detach().numpy() for k, v in
             transformers.AutoModelForCausalLM.from_config(config).named_parameters()}
    return spec, named


def test_missing_wrong_shape_and_unexpected_tensors_are_named():
    spec, named = _llama_case()
    missing = dict(named)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing HF tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        params_from_hf(spec, missing)
    wrong = {**named, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), "
                                         r"expected \(16, 64\)"):
        params_from_hf(spec, wrong)
    extra = {**named, "model.layers.2.mlp.up_proj.weight": named["model.layers.1.mlp.up_proj.weight"]}
    with pytest.raises(ValueError, match=r"not in spec.*'model\.layers\.2\.mlp\.up_proj\.weight'"):
        params_from_hf(spec, extra)
    twice = {**named, "norm.weight": named["model.norm.weight"]}
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' and 'norm\.weight'"):
        params_from_hf(spec, twice)


def test_params_to_hf_names_bad_leaves():
    spec, named = _llama_case()
    params = params_from_hf(spec, named)
    params["blocks"][1]["q"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"blocks\.1\.q\.kernel has shape \(3, 3\).*q_proj"):
        params_to_hf(spec, params)
    del params["blocks"][1]["q"]
    with pytest.raises(ValueError, match=r"params lack blocks\.1\.q\.kernel"):
        params_to_hf(spec, params)


def _config(make, **overrides):
    return {**make().to_dict(), **overrides}


@pytest.mark.parametrize("config, match", [
    ({"model_type": "bert"}, r"model_type='bert'"),
    ({"model_type": "gpt-2"}, r"model_type='gpt-2'; did you mean 'gpt2'"),
    ({}, r"model_type=None"),
    (_config(CONFIGS["opt"], word_embed_proj_dim=16), r"word_embed_proj_dim=16"),
    (_config(CONFIGS["opt"], do_layer_norm_before=False), r"do_layer_norm_before=False"),
    (_config(CONFIGS["opt"], enable_bias=False), r"enable_bias=False"),
    (_config(CONFIGS["gpt2"], activation_function="gelu_fast"), r"activation_function='gelu_fast'"),
    (_config(CONFIGS["gpt2"], scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx=True"),
    (_config(CONFIGS["llama-gqa"], rope_parameters=None, rope_theta=1e4,
             rope_scaling={"type": "linear", "factor": 2.0}),
     r"rope_scaling\.rope_type='linear'"),
    (_config(CONFIGS["llama-gqa"], rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
     r"rope_parameters\.rope_type='llama3'"),
    (_config(CONFIGS["llama-gqa"], attention_bias=True), r"attention_bias=True"),
    (_config(CONFIGS["llama-gqa"], mlp_bias=True), r"mlp_bias=True"),
    (_config(CONFIGS["llama-gqa"], head_dim=16), r"head_dim=16"),
    (_config(CONFIGS["llama-gqa"], hidden_size=None), r"lacks the field 'hidden_size'"),
])
def test_unsupported_configs_name_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        spec_from_hf_config(config)


def test_spec_fields_from_config():
    gpt2 = spec_from_hf_config(_config(CONFIGS["gpt2"], layer_norm_epsilon=1e-6))
    assert (gpt2.activation.value, gpt2.max_seq_len, gpt2.norm_eps, gpt2.tie_embeddings, gpt2.ff_dim) == \
        ("gelu_tanh", SEQ + 8, 1e-6, True, 128)
    opt = spec_from_hf_config(CONFIGS["opt"]())
    assert (opt.activation.value, opt.pos_offset, opt.max_seq_len, opt.ff_dim, opt.tie_embeddings) == \
        ("relu", 2, SEQ + 4, 64, True)
    llama = spec_from_hf_config(CONFIGS["llama-gqa"]())
    assert (llama.arch.value, llama.n_kv_heads, llama.rope_theta, llama.norm_eps, llama.tie_embeddings) == \
        ("llama", 2, 500.0, 1e-5, False)
    legacy = spec_from_hf_config(_config(CONFIGS["llama-gqa"], rope_parameters=None, rope_theta=5e5, rope_scaling=None))
    assert legacy.rope_theta == 5e5
    assert spec_from_hf_config(CONFIGS["mistral"]()).max_seq_len == SEQ  # capped at the sliding window
