"""Tests for lohan_jax.models: parameter counts, unit composition, causality, GQA, tying, masks and dtypes."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lohan_jax.models import REGISTRY, Arch, build_model, cast_floating, decay_mask, get_spec
from lohan_jax.models.spec import ModelSpec

TINY = ["gpt-tiny", "llama-tiny"]
SEQ_LEN = 12


def n_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_params(model, seed=0):
    """fp32 params of the model's tree from numpy: no XLA compile of the random initialisers (seconds on CPU).

    Biases are non-zero and norm scales are not one, so every parameter matters in the tests below."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        value = rng.normal(0.0, 0.1 if a.ndim == 1 else 0.02, a.shape).astype(np.float32)
        return jnp.asarray(value + (1.0 if path[-1].key == "scale" else 0.0), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, model.abstract_params(SEQ_LEN))


@functools.cache
def _tiny(name, seed, tie):
    model = build_model(get_spec(name, **({} if tie is None else {"tie_embeddings": tie})), jnp.float32)
    return model, random_params(model, seed), jax.jit(model.apply)


def init(name, seed=0, tie=None):
    """(fp32 model, fp32 params), memoised: params are immutable, tests share them."""
    return _tiny(name, seed, tie)[:2]


def jit_apply(name, seed=0, tie=None):
    return _tiny(name, seed, tie)[2]


def random_tokens(seed=1, shape=(2, SEQ_LEN), vocab=257):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


# ---- parameter counts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REGISTRY))
def test_param_count_formula_matches_the_modules(name):
    """Every preset, at one layer (eval_shape: nothing allocated). Depth adds identical blocks; tracing all
    presets at full depth costs ~20 s on 2 cores, so full depth is checked for the largest one below."""
    spec = dataclasses.replace(REGISTRY[name], n_layers=1)
    abstract = build_model(spec).abstract_params()
    assert n_params(abstract["embed"]) == spec.embed_param_count()
    assert n_params(abstract["blocks"][0]) == spec.block_param_count()
    assert n_params(abstract["head"]) == spec.head_param_count()
    assert n_params(abstract) == spec.param_count()
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}  # master weights


@pytest.mark.parametrize("name", ["paper-412b", "llama-tiny"])
def test_param_count_at_full_depth(name):
    spec = REGISTRY[name]
    abstract = build_model(spec).abstract_params()  # 412B parameters, no bytes allocated
    assert len(abstract["blocks"]) == spec.n_layers
    assert n_params(abstract) == spec.param_count()


@pytest.mark.parametrize("name, published", [
    # Hugging Face checkpoints' parameter counts (sum of tensor sizes in their safetensors).
    ("llama2-7b", 6_738_415_616),
    ("llama2-13b", 13_015_864_320),
    ("llama2-70b", 68_976_648_192),
    ("llama3-8b", 8_030_261_248),
])
def test_param_count_matches_published_llama(name, published):
    assert get_spec(name).param_count() == published


def test_param_count_matches_gpt2_small():
    # GPT-2 small (openai-community/gpt2): 124,439,808 parameters; GPT-3 125M is its shape with 2048 positions.
    assert get_spec("gpt3-125m", max_seq_len=1024).param_count() == 124_439_808


def test_nonembed_param_count():
    s = get_spec("gpt-tiny")
    assert s.nonembed_param_count() == s.n_layers * s.block_param_count() + 2 * s.d_model


# ---- composition ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_apply_is_the_composition_of_units(name):
    model, params = init(name)
    tokens = random_tokens()
    embed, block, logits_fn = jax.jit(model.embed), jax.jit(model.block), jax.jit(model.logits)
    x = embed(params["embed"], tokens)
    assert x.shape == (2, SEQ_LEN, model.spec.d_model)
    for p_block in params["blocks"]:
        x = block(p_block, x)
    manual = logits_fn(params["head"], params["embed"], x)
    logits = jit_apply(name)(params, tokens)
    assert logits.shape == (2, SEQ_LEN, model.spec.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(manual), rtol=1e-6, atol=1e-6)
    # the blocks are not identity maps: skipping one changes the output
    skipped = logits_fn(params["head"], params["embed"], block(params["blocks"][0], embed(params["embed"], tokens)))
    assert not np.allclose(np.asarray(skipped), np.asarray(logits), atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_loss_is_weighted_token_nll(name):
    model, params = init(name)
    tokens, targets = random_tokens(1), random_tokens(2)
    weights = jnp.full(tokens.shape, 1.0 / tokens.size, jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(jit_apply(name)(params, tokens), targets)
    loss = jax.jit(model.loss)(params, tokens, targets, weights)
    np.testing.assert_allclose(float(loss), float(jnp.mean(nll)), rtol=1e-6)
    # at init the prediction is near uniform: the loss is close to log(vocab)
    assert abs(float(jnp.mean(nll)) - np.log(model.spec.vocab_size)) < 0.1


def test_init_is_deterministic_and_blocks_are_independent():
    model = build_model(get_spec("gpt-tiny"), jnp.float32)
    seq_len = 32  # eager, at the CLI test's seq_len: the compiled primitives are shared with its run
    params = model.init(jax.random.key(0), seq_len)
    jax.tree.map(np.testing.assert_array_equal, params, model.init(jax.random.key(0), seq_len))
    other = model.init(jax.random.key(1), seq_len)
    kernel = lambda p, i: np.asarray(p["blocks"][i]["qkv"]["kernel"])  # noqa: E731
    assert not np.array_equal(kernel(params, 0), kernel(params, 1))  # block i from fold_in(key, i)
    assert not np.array_equal(kernel(params, 0), kernel(other, 0))
    assert jax.tree.structure(params["blocks"][0]) == jax.tree.structure(params["blocks"][1])
    assert np.std(kernel(params, 0)) == pytest.approx(model.spec.init_std, rel=0.1)
    np.testing.assert_array_equal(np.asarray(params["blocks"][0]["ln_1"]["scale"]), 1.0)  # norms start at 1
    np.testing.assert_array_equal(np.asarray(params["blocks"][0]["qkv"]["bias"]), 0.0)
    out_std = model.spec.init_std / (2 * model.spec.n_layers) ** 0.5  # GPT-2's scaled residual projections
    assert np.std(np.asarray(params["blocks"][0]["proj"]["kernel"])) == pytest.approx(out_std, rel=0.1)


@pytest.mark.parametrize("name", TINY)
def test_activation_names_tag_the_block(name):
    """The activation-policy candidates a model declares exist as checkpoint_name tags in its block."""
    model, params = init(name)
    x = model.embed(params["embed"], random_tokens())
    jaxpr = str(jax.make_jaxpr(model.block)(params["blocks"][0], x))
    assert model.activation_names
    for tag in model.activation_names:
        assert f"name={tag}" in jaxpr, tag


# ---- causality -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_causality(name):
    model, params = init(name)
    tokens = random_tokens()
    t = 7
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % model.spec.vocab_size)
    apply = jit_apply(name)
    a, b = np.asarray(apply(params, tokens)), np.asarray(apply(params, changed))
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)  # the past does not see the future
    assert np.abs(a[:, t:] - b[:, t:]).max(axis=-1).min() > 1e-5  # position t and later all see the change


@pytest.mark.parametrize("name", TINY)
def test_positions_matter(name):
    """Without positions, the last output would ignore the order of the earlier tokens (attention is a set
    operation); learned positions (GPT) and rotary (LLaMA) must break that symmetry."""
    model, params = init(name)
    tokens = random_tokens()
    shuffled = tokens.at[:, :-1].set(tokens[:, :-1][:, ::-1])
    apply = jit_apply(name)
    last = lambda t: np.asarray(apply(params, t))[:, -1]  # noqa: E731
    assert np.abs(last(tokens) - last(shuffled)).max() > 1e-4


# ---- grouped-query attention ---------------------------------------------------------------------------------
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa_spec = get_spec("llama-tiny")
    assert gqa_spec.kv_heads < gqa_spec.n_heads
    model, params = init("llama-tiny")
    d, hd, n, k = gqa_spec.d_model, gqa_spec.head_dim, gqa_spec.n_heads, gqa_spec.kv_heads
    block0 = params["blocks"][0]
    assert block0["k"]["kernel"].shape == (d, k * hd) and block0["q"]["kernel"].shape == (d, n * hd)
    tokens = random_tokens()
    logits = jit_apply("llama-tiny")(params, tokens)
    assert bool(jnp.all(jnp.isfinite(logits)))

    # query head j reads kv head j // (n // k): MHA whose kv kernels repeat each kv head n // k times
    mha_model = build_model(dataclasses.replace(gqa_spec, n_kv_heads=0), jnp.float32)
    repeat = lambda w: jnp.repeat(w.reshape(d, k, hd), n // k, axis=1).reshape(d, n * hd)  # noqa: E731
    mha_params = {**params, "blocks": [
        {**p, "k": {"kernel": repeat(p["k"]["kernel"])}, "v": {"kernel": repeat(p["v"]["kernel"])}}
        for p in params["blocks"]]}
    assert n_params(mha_params) == mha_model.spec.param_count()
    np.testing.assert_allclose(np.asarray(jax.jit(mha_model.apply)(mha_params, tokens)), np.asarray(logits),
                               rtol=1e-5, atol=1e-5)


def test_gqa_spec_validation():
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide"):
        get_spec("llama-tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="only supported for arch=llama"):
        get_spec("gpt-tiny", n_kv_heads=2)
    with pytest.raises(ValueError, match="not divisible"):
        ModelSpec(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="even head_dim"):
        ModelSpec(arch=Arch.LLAMA, d_model=12, n_heads=4)


# ---- tied and untied heads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_tied_and_untied_head_trees(name):
    for tie in (True, False):
        spec = get_spec(name, tie_embeddings=tie)
        abstract = build_model(spec, jnp.float32).abstract_params()
        assert ("lm_head" in abstract["head"]) is not tie
        if not tie:
            assert abstract["head"]["lm_head"].shape == (spec.d_model, spec.vocab_size)
        assert n_params(abstract) == spec.param_count()
        assert spec.param_count() - spec.head_param_count() == get_spec(name).param_count() - (
            get_spec(name).head_param_count())


def test_tied_head_reads_the_token_embedding():
    """Tied, the logits of token v read embedding row v; untied, embedding rows reach the logits only through
    the input tokens."""
    tokens = random_tokens(vocab=50)  # ids 50.. never appear in the input

    def bump(p):  # move the embedding rows of the unseen tokens
        wte = p["embed"]["wte"]["embedding"].at[50:].add(0.5)
        return {**p, "embed": {**p["embed"], "wte": {"embedding": wte}}}

    model, params = init("gpt-tiny")
    apply = jit_apply("gpt-tiny")
    a, b = np.asarray(apply(params, tokens)), np.asarray(apply(bump(params), tokens))
    np.testing.assert_array_equal(a[..., :50], b[..., :50])
    assert np.abs(a[..., 50:] - b[..., 50:]).min() > 0  # every logit of an unseen token moved

    model, params = init("gpt-tiny", tie=False)
    apply = jit_apply("gpt-tiny", tie=False)
    np.testing.assert_array_equal(np.asarray(apply(params, tokens)), np.asarray(apply(bump(params), tokens)))
    head_bumped = {**params, "head": {**params["head"], "lm_head": params["head"]["lm_head"] + 0.5}}
    assert not np.allclose(np.asarray(apply(params, tokens)), np.asarray(apply(head_bumped, tokens)))


# ---- decay mask and dtypes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_decay_mask_excludes_vectors(name):
    _, params = init(name)
    mask = decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params), strict=True):
        assert m is (p.ndim >= 2)
    assert mask["embed"]["wte"]["embedding"] is True
    assert False in jax.tree.leaves(mask) and True in jax.tree.leaves(mask)


def test_decay_mask_on_gpt_paths():
    _, params = init("gpt-tiny")
    mask = decay_mask(params)["blocks"][0]
    assert mask["qkv"]["kernel"] and mask["fc"]["kernel"]
    assert not mask["qkv"]["bias"] and not mask["ln_1"]["scale"] and not mask["ln_1"]["bias"]


def test_cast_floating():
    tree = {"w": jnp.ones((2, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32),
            "ids": jnp.arange(3, dtype=jnp.int32), "flag": jnp.array([True, False])}
    out = cast_floating(tree, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.bfloat16
    assert out["ids"].dtype == jnp.int32 and out["flag"].dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(out["ids"]), [0, 1, 2])
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    back = cast_floating(out, jnp.float32)
    np.testing.assert_array_equal(np.asarray(back["w"]), np.ones((2, 3), np.float32))


def _bf16_close_to_fp32(name):
    model32, params = init(name)
    model16 = build_model(model32.spec, jnp.bfloat16)
    tokens = random_tokens()
    ref = np.asarray(jit_apply(name)(params, tokens))
    out = jax.jit(model16.apply)(cast_floating(params, jnp.bfloat16), tokens)
    assert out.dtype == jnp.float32  # logits accumulate in fp32 whatever the compute dtype
    err = np.abs(np.asarray(out) - ref).max()
    assert 0 < err < 0.02 * np.abs(ref).max()  # really computed in bf16, and close


@pytest.mark.parametrize("name", TINY)
def test_bf16_compute_close_to_fp32(name):
    """Under the strict promotion conftest sets: every bf16/fp32 meeting in the model is an explicit cast."""
    _bf16_close_to_fp32(name)


# ---- norms and attention (checked against flax's and jax's own implementations) ------------------------------
def test_layer_norm_and_rms_norm_match_flax():
    import flax.linen as nn

    from lohan_jax.models.norms import LayerNorm, RMSNorm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, (2, 3, 8)).astype(np.float32))
    scale = jnp.asarray(rng.normal(1.0, 0.1, 8).astype(np.float32))
    bias = jnp.asarray(rng.normal(0.0, 0.1, 8).astype(np.float32))
    ours = LayerNorm(1e-5, jnp.float32).apply({"params": {"scale": scale, "bias": bias}}, x)
    theirs = nn.LayerNorm(1e-5, dtype=jnp.float32).apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
    ours = RMSNorm(1e-6, jnp.float32).apply({"params": {"scale": scale}}, x)
    theirs = nn.RMSNorm(1e-6, dtype=jnp.float32).apply({"params": {"scale": scale}}, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
    # the params the model declares are flax's names and shapes
    assert jax.tree.map(jnp.shape, LayerNorm(1e-5, jnp.float32).init(jax.random.key(0), x)["params"]) == {
        "scale": (8,), "bias": (8,)}


def test_norm_and_activation_backwards_match_autodiff():
    """The hand-written backward passes (which keep only inputs and row statistics) against autodiff of flax's
    norms and jax.nn's activations, in fp32 and in bf16 (the models' dtype)."""
    import flax.linen as nn

    from lohan_jax.models.activations import pointwise, swiglu
    from lohan_jax.models.norms import layer_norm, rms_norm
    from lohan_jax.models.spec import Activation

    rng = np.random.default_rng(1)
    x32 = jnp.asarray(rng.normal(0.5, 2.0, (2, 5, 16)).astype(np.float32))
    u32 = jnp.asarray(rng.normal(0.0, 1.5, (2, 5, 16)).astype(np.float32))
    g32 = jnp.asarray(rng.normal(0.0, 1.0, (2, 5, 16)).astype(np.float32))
    scale = jnp.asarray(rng.normal(1.0, 0.2, 16).astype(np.float32))
    bias = jnp.asarray(rng.normal(0.0, 0.2, 16).astype(np.float32))
    plain = {
        "layer_norm": (lambda x, s, b: layer_norm(x, s, b, 1e-5, x.dtype),
                       lambda x, s, b: nn.LayerNorm(1e-5, dtype=x.dtype).apply({"params": {"scale": s, "bias": b}}, x)),
        "rms_norm": (lambda x, s, b: rms_norm(x, s, 1e-6, x.dtype) + 0 * b.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,)),
                     lambda x, s, b: nn.RMSNorm(1e-6, dtype=x.dtype).apply({"params": {"scale": s}}, x)
                     + 0 * b.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))),
        "swiglu": (lambda x, s, b: swiglu(x, x * 0.5 + 1), lambda x, s, b: jax.nn.silu(x) * (x * 0.5 + 1)),
        **{a.value: (lambda x, s, b, a=a: pointwise(a)(x), lambda x, s, b, a=a: {
            Activation.GELU: lambda v: jax.nn.gelu(v, approximate=False),
            Activation.GELU_TANH: lambda v: jax.nn.gelu(v, approximate=True),
            Activation.RELU: jax.nn.relu, Activation.SILU: jax.nn.silu}[a](x)) for a in Activation},
    }
    cases = [(jnp.float32, 2e-5, x32, g32), (jnp.bfloat16, 3e-2, x32 + 0.1 * u32, g32),
             (jnp.float32, 2e-5, x32.reshape(10, 16), g32.reshape(10, 16))]  # rank 2 as well
    for dtype, tol, x, g in cases:
        x, g = x.astype(dtype), g.astype(dtype)
        for name, (ours, theirs) in plain.items():
            if x.ndim == 2 and "norm" not in name:
                continue  # rank matters only where a statistic is taken over the last axis
            both = lambda f, *a: (lambda y, vjp: (y, vjp(a[-1])))(*jax.vjp(f, *a[:-1]))
            y1, d1 = jax.jit(lambda *a: both(ours, *a))(x, scale, bias, g)  # under the suite's strict promotion
            with jax.numpy_dtype_promotion("standard"):  # flax's norms mix fp32 params into bf16
                y2, d2 = jax.jit(lambda *a: both(theirs, *a))(x, scale, bias, g)
            np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32), rtol=tol, atol=tol,
                                       err_msg=name)
            for a, b_ in zip(d1, d2):
                assert a.dtype == b_.dtype, name
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), rtol=tol,
                                           atol=tol * float(jnp.abs(b_.astype(jnp.float32)).max() + 1e-3),
                                           err_msg=f"{name} {dtype.__name__}")


def test_cudnn_refusal_falls_back_to_xla_and_says_so(monkeypatch):
    """On a GPU, a shape cuDNN refuses runs XLA's attention (same result) with one warning naming the reason."""
    from lohan_jax.models import attention

    def refuse(*a, **k):
        raise NotImplementedError("The head dim must be <= 256 and a multiple of 8, but got 8.")

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention", refuse)
    attention._warn_fallback_once.cache_clear()
    q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 2, 8)), jnp.bfloat16)
    with pytest.warns(UserWarning, match=r"cuDNN attention refused q of shape \(1, 4, 2, 8\)"):
        out = attention.causal_attention(q, q, q)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(attention._xla_attention(q, q, q), np.float32))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_xla_attention_matches_jax_dot_product_attention(n_kv_heads):
    from lohan_jax.models.attention import causal_attention

    rng = np.random.default_rng(n_kv_heads)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(2, 6, n_kv_heads, 8)).astype(np.float32)) for _ in range(2))
    ours = jax.jit(causal_attention)(q, k, v)
    with jax.numpy_dtype_promotion("standard"):
        theirs = jax.jit(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, implementation="xla"))(q, k, v)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


# ---- registry ------------------------------------------------------------------------------------------------
def test_get_spec_overrides_and_typos():
    assert get_spec("gpt-tiny", n_layers=5).n_layers == 5
    assert REGISTRY["gpt-tiny"].n_layers == 2  # the registry entry is not mutated
    with pytest.raises(ValueError, match="did you mean llama-tiny"):
        get_spec("lama-tiny")


def test_registry_names_are_keys_and_archs_are_right():
    for name, spec in REGISTRY.items():
        assert spec.name == name
        assert spec.tie_embeddings is (spec.arch is Arch.GPT)
    assert get_spec("llama2-70b").kv_heads == 8 and get_spec("llama3-8b").kv_heads == 8
