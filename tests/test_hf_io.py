"""Tests of HF checkpoint import and export: safetensors files read and written by us and by transformers
(bf16 included), single and sharded checkpoints, unit-by-unit import, a fine-tuned export that transformers
loads with logits equal to ours, and the errors a user meets (architecture, shards, tensors, shapes)."""
import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from lohan_jax.config import ConfigError, config_from_dict, config_to_dict, load_config  # noqa: E402
from lohan_jax.hf import (  # noqa: E402
    HFCheckpoint,
    SafetensorsReader,
    SafetensorsWriter,
    export_checkpoint,
    hf_config_from_spec,
    params_from_hf,
    read_header,
    spec_from_hf_config,
)
from lohan_jax.models import build_model, get_spec  # noqa: E402
from lohan_jax.models.spec import Activation, ModelSpec  # noqa: E402

VOCAB, SEQ = 97, 16
_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                            **_TOKENS),
    "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                          vocab_size=VOCAB, max_position_embeddings=32, word_embed_proj_dim=32,
                                          **_TOKENS),
    "llama": lambda: transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                                              max_position_embeddings=64, **_TOKENS),
}


def save_tiny(directory, arch="llama", dtype=torch.float32, max_shard_size=None):
    """A tiny transformers model saved with save_pretrained; returns (model in fp32, its state dict as numpy)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1: perturb them so every layout matters
            p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    return model.float().eval(), {k: v.float().numpy() for k, v in model.state_dict().items()}


def hf_logits(directory, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def our_logits(spec, params, tokens):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(build_model(spec, jnp.float32).apply)(params, jnp.asarray(tokens, jnp.int32)))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ), dtype=np.int32)


def random_params(spec, seed=0):
    """fp32 numpy params of `spec`'s shapes, without compiling the model's init (fast)."""
    rng = np.random.default_rng(seed)
    abstract = build_model(spec, jnp.float32).abstract_params()
    return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), abstract)


# ---- the safetensors format ----------------------------------------------------------------------------------
def test_tensorfile_round_trip_and_interop(tmp_path):
    from safetensors.torch import load_file as load_torch

    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
              "c": np.arange(6, dtype=np.int64).reshape(2, 3), "d": np.float16(2.5) * np.ones((2, 2), np.float16),
              "e": np.zeros((0, 4), np.float32)}
    path = tmp_path / "x.safetensors"
    codes = {"a": "F32", "b": "BF16", "c": "I64", "d": "F16", "e": "F32"}
    with SafetensorsWriter(path, [(k, codes[k], a.shape) for k, a in arrays.items()], {"format": "pt"}) as w:
        for k, a in arrays.items():
            w.write(k, a)
    with SafetensorsReader(path) as r:
        assert r.metadata == {"format": "pt"}
        for k, a in arrays.items():
            got = r.read(k)
            assert got.dtype == a.dtype and got.shape == a.shape
            np.testing.assert_array_equal(got.astype(np.float64), a.astype(np.float64))
    torch_view = load_torch(path)  # the reference implementation reads our file, bf16 included
    assert torch_view["b"].dtype == torch.bfloat16
    np.testing.assert_array_equal(torch_view["b"].float().numpy(), arrays["b"].astype(np.float32))
    np.testing.assert_array_equal(torch_view["a"].numpy(), arrays["a"])
    assert torch_view["e"].shape == (0, 4)


def test_tensorfile_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="expected the next declared tensor 'a'"):
        with SafetensorsWriter(path, [("a", "F32", (2,))]) as w:
            w.write("b", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="never written"):
        SafetensorsWriter(path, [("a", "F32", (2,))]).close()
    with SafetensorsWriter(path, [("a", "F32", (1000,))]) as w:
        w.write("a", np.zeros(1000, np.float32))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut\.safetensors is truncated: tensor 'a' ends at byte"):
        read_header(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05" * 64)
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        read_header(tmp_path / "junk.safetensors")


# ---- import ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, dtype, shard", [("llama", torch.bfloat16, "20KB"), ("gpt2", torch.float32, None),
                                                ("opt", torch.float32, "30KB")])
def test_import_equals_state_dict(tmp_path, arch, dtype, shard):
    """save_pretrained's files (sharded or not, bf16 or fp32) import to exactly params_from_hf of its weights."""
    _, state = save_tiny(tmp_path / "ckpt", arch, dtype, shard)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file() == (shard is not None)
    with HFCheckpoint(tmp_path / "ckpt") as ckpt:
        assert ckpt.spec.name == "ckpt" and ckpt.dtype == {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
        expected = params_from_hf(ckpt.spec, state)
        units = [ckpt.unit_params(k) for k in range(ckpt.spec.n_layers + 2)]
        assert jax.tree.structure(units[0]) == jax.tree.structure(expected["embed"])
        jax.tree.map(np.testing.assert_array_equal, ckpt.params(),
                     {"embed": units[0], "blocks": units[1:-1], "head": units[-1]})
        jax.tree.map(np.testing.assert_array_equal, ckpt.params(), expected)
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(ckpt.params()))
        abstract = build_model(ckpt.spec, jnp.float32).abstract_params()
        assert jax.tree.structure(ckpt.params()) == jax.tree.structure(abstract)


# ---- export ------------------------------------------------------------------------------------------------------
def test_export_round_trip_sharded_bf16(tmp_path):
    """Export of an imported bf16 checkpoint, sharded: transformers loads bit-identical weights."""
    model, _ = save_tiny(tmp_path / "ckpt", "llama", torch.bfloat16)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    with HFCheckpoint(tmp_path / "ckpt") as ckpt:
        out = export_checkpoint(ckpt.spec, ckpt.unit_params, tmp_path / "out", dtype="bfloat16",
                                max_shard_bytes=10_000, hf_config=ckpt.config, side_files=ckpt.side_files())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".out.partial*"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16
    for (name, a), b in zip(model.state_dict().items(), back.float().state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_export_from_scratch_loads_in_transformers(tmp_path):
    """A registry model (never seen by transformers) exports with a derived config.json; logits match ours."""
    for spec in (get_spec("gpt-tiny"), get_spec("llama-tiny"),
                 ModelSpec(name="opt-like", n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, max_seq_len=32,
                           activation=Activation.RELU, pos_offset=2)):
        back = spec_from_hf_config(hf_config_from_spec(spec))
        assert back == dataclasses.replace(spec, name=back.name, d_ff=spec.ff_dim)  # d_ff=0 means 4 * d_model
        params = random_params(spec)
        out = export_checkpoint(spec, params, tmp_path / spec.name)
        tokens = TOKENS % spec.vocab_size
        np.testing.assert_allclose(our_logits(spec, params, tokens), hf_logits(out, tokens), atol=1e-4,
                                   err_msg=spec.name)


def test_fine_tune_export_parity(tmp_path):
    """The parity contract: a checkpoint written by transformers, imported, fine-tuned N steps by the offload
    engine and exported, loads back in transformers with logits equal to ours on the trained weights."""
    from lohan_jax.train import run_training

    _, state = save_tiny(tmp_path / "ckpt", "llama", torch.float32, "20KB")
    cfg = load_config(None, [f"hf.checkpoint={tmp_path / 'ckpt'}", f"hf.export_dir={tmp_path / 'export'}",
                             "train.steps=3", "train.seq_len=16", "train.batch_size=4", "train.engine=offload",
                             "optim.lr=1e-2", f"data.source=synthetic:{VOCAB}"])
    assert cfg.model.vocab_size == VOCAB and cfg.hf.export_dtype == "auto"
    result = run_training(cfg, run_dir=tmp_path / "run", progress=False, keep_params=True)
    assert (tmp_path / "export" / "config.json").is_file()
    initial = params_from_hf(cfg.model, state)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), result.params, initial)
    assert all(jax.tree.leaves(changed))  # every tensor was trained
    np.testing.assert_allclose(our_logits(cfg.model, result.params, TOKENS), hf_logits(tmp_path / "export", TOKENS),
                               atol=1e-4)


def test_reference_engine_imports_whole_tree(tmp_path):
    """The reference trainer takes the checkpoint as one tree (GPT-2: tied head, learned positions)."""
    from lohan_jax.train import run_training

    save_tiny(tmp_path / "ckpt", "gpt2")
    cfg = load_config(None, [f"hf.checkpoint={tmp_path / 'ckpt'}", "train.steps=1", "train.seq_len=16",
                             "train.batch_size=2", "train.engine=reference", f"data.source=synthetic:{VOCAB}",
                             "optim.lr=1e-9", "optim.weight_decay=0"])
    result = run_training(cfg, run_dir=tmp_path / "run", progress=False, keep_params=True)
    with HFCheckpoint(tmp_path / "ckpt") as ckpt:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), result.params, ckpt.params())


# ---- config ------------------------------------------------------------------------------------------------------
def test_config_from_checkpoint(tmp_path):
    save_tiny(tmp_path / "my-model", "llama")
    cfg = load_config(None, [f"hf.checkpoint={tmp_path / 'my-model'}", "model.max_seq_len=32", "train.seq_len=32"])
    assert cfg.model.name == "my-model" and cfg.model.vocab_size == VOCAB and cfg.model.max_seq_len == 32
    assert cfg.model.n_kv_heads == 2 and cfg.model.d_ff == 48
    assert config_from_dict(config_to_dict(cfg)) == cfg  # the run directory's config.yaml reloads
    with pytest.raises(ConfigError, match="hf.checkpoint: HF checkpoint .*missing.* is not a directory"):
        load_config(None, [f"hf.checkpoint={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="hf.export_dtype='int8'"):
        load_config(None, ["hf.export_dtype=int8"])


# ---- errors a user meets -----------------------------------------------------------------------------------------
def _edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_import_errors_name_the_problem(tmp_path):
    save_tiny(tmp_path / "ok", "llama", max_shard_size="20KB")

    def variant(name):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        return tmp_path / name

    bert = variant("bert")
    _edit_config(bert, model_type="bert")
    with pytest.raises(ValueError, match=r"unsupported HF config model_type='bert'.*Supported: gpt2, opt, llama"):
        HFCheckpoint(bert)
    with pytest.raises(ConfigError, match="model_type='bert'"):
        load_config(None, [f"hf.checkpoint={bert}"])

    shards = sorted(p.name for p in (tmp_path / "ok").glob("*.safetensors"))
    assert len(shards) > 2
    missing_shard = variant("missing_shard")
    (missing_shard / shards[1]).unlink()
    with pytest.raises(ValueError, match=rf"incomplete: 1 of the {len(shards)} shards .* missing: {shards[1]}"):
        HFCheckpoint(missing_shard)

    wrong_shape = variant("wrong_shape")
    _edit_config(wrong_shape, intermediate_size=64)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' in model-0000\d-of-0000"
                                         r"\d\.safetensors has shape \(48, 32\), expected \(64, 32\)"):
        HFCheckpoint(wrong_shape)

    fewer_layers = variant("fewer_layers")
    _edit_config(fewer_layers, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"tensors that the llama model of 1 layers does not use: "
                                         r"'model\.layers\.1\."):
        HFCheckpoint(fewer_layers)

    more_layers = variant("more_layers")
    _edit_config(more_layers, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.2\.input_layernorm\.weight'"):
        HFCheckpoint(more_layers)

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(tmp_path / "ok" / "config.json", pickles)
    (pickles / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only PyTorch pickles.*safe_serialization=True"):
        HFCheckpoint(pickles)
    with pytest.raises(ValueError, match="has no config.json"):
        HFCheckpoint(tmp_path)

    truncated = variant("truncated")
    shard = truncated / shards[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shards[0]} is truncated"):
        HFCheckpoint(truncated)


def test_export_errors(tmp_path):
    spec = get_spec("llama-tiny")
    params = random_params(spec)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_checkpoint(spec, params, tmp_path / "taken")
    params["blocks"][1]["q"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"blocks\.1\.q\.kernel has shape \(3, 3\).*q_proj"):
        export_checkpoint(spec, params, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial*"))
    with pytest.raises(ValueError, match="export dtype 'int8'"):
        export_checkpoint(spec, params, tmp_path / "int8", dtype="int8")


def test_train_refuses_a_taken_export_dir_before_training(tmp_path):
    from lohan_jax.cli import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").write_text("")
    code = main(["train", "--no-progress", "--set", "model.name=gpt-tiny", "--set", "train.steps=1",
                 "--set", f"hf.export_dir={tmp_path / 'taken'}", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and not (tmp_path / "run" / "metrics.jsonl").exists()
