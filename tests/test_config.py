"""Tests for lohan_jax.config: defaults, YAML files, dotted overrides, strict validation, and configs/."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from lohan_jax.config import (
    Config,
    ConfigError,
    DataConfig,
    EngineKind,
    OptimConfig,
    Schedule,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from lohan_jax.models import Activation, Arch, ModelSpec, get_spec

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- defaults ------------------------------------------------------------------------------------------------
def test_defaults_construct_and_validate():
    cfg = Config()
    assert cfg.model == get_spec("gpt-small")
    assert cfg.train == TrainConfig() and cfg.optim == OptimConfig() and cfg.data == DataConfig()
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert cfg.train.micro_batch_size * cfg.train.micro_batches == cfg.train.batch_size
    assert load_config() == cfg  # no file, no overrides: the defaults


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.steps = 3  # type: ignore[misc]


def test_micro_batch_size():
    assert TrainConfig(batch_size=12, micro_batches=4).micro_batch_size == 3


# ---- YAML and overrides --------------------------------------------------------------------------------------
def test_yaml_file_then_overrides(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", """
model:
  name: gpt-tiny
train:
  steps: 7
  batch_size: 8
  engine: reference
optim:
  lr: 1e-4          # no dot: YAML reads a string, the float field still accepts it
  schedule: constant
  weight_decay: 0   # an int for a float field
""")
    cfg = load_config(path, ["train.steps=9", "optim.clip_norm=1.5", "data.source=synthetic:100"])
    assert cfg.model.name == "gpt-tiny"
    assert cfg.train.steps == 9  # the override wins over the file
    assert cfg.train.batch_size == 8  # the file wins over the default
    assert cfg.train.engine is EngineKind.REFERENCE
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.schedule is Schedule.CONSTANT
    assert cfg.optim.clip_norm == 1.5
    assert cfg.data.source == "synthetic:100"
    assert cfg.train.seq_len == TrainConfig().seq_len  # untouched fields keep their defaults


def test_override_later_wins_and_empty_value_is_empty_string():
    cfg = load_config(None, ["train.steps=3", "train.steps=4", "data.token_dtype="])
    assert cfg.train.steps == 4
    assert cfg.data.token_dtype == ""


def test_model_preset_plus_field_overrides(tmp_path):
    path = write_yaml(tmp_path / "m.yaml", "model:\n  name: llama-tiny\n  d_model: 64\n  n_layers: 3\n")
    cfg = load_config(path, ["model.rope_theta=500000"])
    preset = get_spec("llama-tiny")
    assert cfg.model == dataclasses.replace(preset, d_model=64, n_layers=3, rope_theta=500000.0)
    assert cfg.model.arch is Arch.LLAMA and cfg.model.n_kv_heads == preset.n_kv_heads  # rest of the preset kept


def test_model_enum_fields_from_strings():
    cfg = load_config(None, ["model.name=gpt-tiny", "model.activation=relu", "model.pos_offset=2"])
    assert cfg.model.activation is Activation.RELU and cfg.model.pos_offset == 2


def test_model_section_without_name_uses_the_default_preset():
    assert load_config(None, ["model.n_layers=2"]).model == get_spec("gpt-small", n_layers=2)


# ---- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, suggestion", [
    ("trian.steps=3", "did you mean train?"),
    ("train.setps=3", "did you mean train.steps?"),
    ("optim.weight_dacay=0.1", "did you mean optim.weight_decay?"),
    ("data.sorce=synthetic", "did you mean data.source?"),
    ("model.n_layer=3", "did you mean model.n_layers?"),
    ("offload.prefetch_dept=3", "did you mean offload.prefetch_depth?"),
])
def test_unknown_keys_suggest_the_closest(override, suggestion):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(None, [override])
    assert suggestion in str(e.value)


def test_unknown_key_in_yaml_file_names_the_section(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"train\.batch_sise; did you mean train\.batch_size\?"):
        load_config(path)


def test_unknown_key_with_nothing_close_lists_known_keys():
    with pytest.raises(ConfigError, match="known keys: .*lr.*clip_norm"):
        load_config(None, ["optim.zzz=1"])


@pytest.mark.parametrize("override, names", [
    ("train.steps=abc", ["train.steps", "expected int"]),
    ("train.steps=3.5", ["train.steps", "expected int"]),
    ("train.steps=true", ["train.steps", "expected int", "bool"]),
    ("train.seq_len=", ["train.seq_len", "expected int"]),
    ("optim.lr=fast", ["optim.lr", "expected float"]),
    ("optim.lr=true", ["optim.lr", "expected float"]),
    ("data.source=123", ["data.source", "expected str"]),
    ("model.d_model=64.0", ["model.d_model", "expected int"]),
    ("model.tie_embeddings=1", ["model.tie_embeddings", "expected bool"]),
    ("train.steps.sub=1", ["train.steps", "expected int"]),
])
def test_wrong_types_are_rejected(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("override, names", [
    ("train.engine=gpu", ["train.engine", "offload", "reference"]),
    ("optim.schedule=linear", ["optim.schedule", "cosine"]),
    ("model.arch=bert", ["model.arch", "llama"]),
    ("model.activation=tanh", ["model.activation", "gelu"]),
    ("train.compute_dtype=fp16", ["train.compute_dtype", "bfloat16"]),
    ("train.attention=flash", ["train.attention", "cudnn"]),
    ("data.token_dtype=int8", ["data.token_dtype", "uint16"]),
    ("offload.weights=disk", ["offload.weights", "host or hbm"]),
    ("offload.disk_io_order=optimized", ["offload.disk_io_order", "reordered", "naive"]),
    ("offload.disk_io_mode=o_direct", ["offload.disk_io_mode", "default", "direct"]),
])
def test_bad_enum_values_list_the_choices(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("overrides, names", [
    (["train.steps=0"], ["train.steps", "> 0"]),
    (["train.batch_size=-4"], ["train.batch_size"]),
    (["optim.lr=0"], ["optim.lr"]),
    (["optim.b2=1.0"], ["optim.b1/b2"]),
    (["optim.weight_decay=-0.1"], ["optim.weight_decay"]),
    (["optim.clip_norm=-1"], ["optim.clip_norm"]),
    (["optim.min_lr_ratio=2"], ["optim.min_lr_ratio"]),
    (["data.eval_fraction=1.0"], ["data.eval_fraction"]),
    (["train.batch_size=6", "train.micro_batches=4"], ["train.micro_batches=4", "train.batch_size=6"]),
    (["model.name=gpt-tiny", "train.seq_len=512"], ["train.seq_len=512", "max_seq_len=256"]),
    (["model.name=gpt-tiny", "model.n_heads=5"], ["model.d_model=32", "model.n_heads=5"]),
    (["model.name=llama-tiny", "model.n_kv_heads=3"], ["model.n_kv_heads=3"]),
    (["model.name=gpt-tiny", "model.n_kv_heads=2"], ["model.n_kv_heads", "llama"]),
    (["model.n_layers=0"], ["model.n_layers"]),
])
def test_bad_values_name_the_field(overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("override", [
    "train.seed=-1",
    "train.eval_every=-5",
])
def test_negative_counters_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_model_name_typo_suggests_the_preset():
    with pytest.raises(ConfigError, match=r"unknown model name 'gpt-tiy'; did you mean gpt-tiny"):
        load_config(None, ["model.name=gpt-tiy"])
    with pytest.raises(ConfigError, match=r"unknown model name 'paper13b'.*paper-13b"):
        load_config(None, ["model.name=paper13b"])


@pytest.mark.parametrize("override, fragment", [
    ("noequals", "section.key=value"),
    ("=3", "section.key=value"),
    ("train=3", "section 'train' must be a mapping"),
])
def test_malformed_overrides(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_override_into_a_value_is_refused(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "train:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="'steps' is a value, not a section"):
        load_config(path, ["train.steps.x=1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a directory is not a config file
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path / "broken.yaml", "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config(write_yaml(tmp_path / "flat.yaml", "model: gpt-tiny\n"))
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == Config()  # an empty file is the defaults


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)  # callers (the CLI) catch ValueError


# ---- round trip ----------------------------------------------------------------------------------------------
def test_config_to_dict_round_trips():
    cfg = load_config(None, [
        "model.name=llama-tiny", "model.d_model=48", "model.norm_eps=1e-6", "train.engine=reference",
        "train.micro_batches=4", "optim.schedule=constant", "optim.clip_norm=1.0", "data.source=synthetic"])
    as_dict = config_to_dict(cfg)
    assert as_dict["train"]["engine"] == "reference" and as_dict["model"]["arch"] == "llama"  # enums as values
    assert yaml.safe_load(yaml.safe_dump(as_dict)) == as_dict  # plain YAML types only
    assert config_from_dict(as_dict) == cfg


def test_save_config_round_trips_through_load_config(tmp_path):
    cfg = load_config(None, ["model.name=gpt-tiny", "optim.lr=3e-4", "optim.eps=1e-12", "train.steps=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_custom_model_spec_round_trips():
    cfg = Config(model=ModelSpec(n_layers=3, d_model=48, n_heads=4), train=TrainConfig(seq_len=64))
    assert config_from_dict(config_to_dict(cfg)) == cfg


# ---- configs/ ------------------------------------------------------------------------------------------------
CONFIG_FILES = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_configs_dir_has_the_documented_files():
    names = {p.name for p in CONFIG_FILES}
    assert {"quickstart.yaml", "gpt3-1.3b.yaml", "paper-6b.yaml", "paper-13b.yaml", "llama-tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_disk_io_settings_reach_the_store():
    from lohan_jax.tiers.store import IO_MODES

    cfg = load_config(None, ["offload.disk_io_mode=direct", "offload.disk_io_concurrency=32"])
    assert (cfg.offload.disk_io_mode, cfg.offload.disk_io_concurrency) == ("direct", 32)
    assert all(load_config(None, [f"offload.disk_io_mode={m}"]) for m in IO_MODES)  # every mode the store knows
    with pytest.raises(ConfigError, match="offload.disk_io_concurrency=0"):
        load_config(None, ["offload.disk_io_concurrency=0"])


def test_quickstart_spells_out_the_defaults():
    """configs/quickstart.yaml documents Config(); it must change when a default does."""
    raw = yaml.safe_load((CONFIGS_DIR / "quickstart.yaml").read_text())
    defaults = config_to_dict(Config())
    for section, fields in defaults.items():
        if section == "model":
            assert raw["model"] == {"name": fields["name"]}
        else:
            assert raw[section] == fields, section  # every field written, each with its default value
    assert load_config(CONFIGS_DIR / "quickstart.yaml") == Config()


@pytest.mark.parametrize("name, model, engine", [
    ("gpt3-1.3b", "gpt3-1.3b", EngineKind.REFERENCE),
    ("paper-6b", "paper-6b", EngineKind.OFFLOAD),
    ("paper-13b", "paper-13b", EngineKind.OFFLOAD),
])
def test_benchmark_configs(name, model, engine):
    cfg = load_config(CONFIGS_DIR / f"{name}.yaml")
    assert cfg.model == get_spec(model)
    assert (cfg.train.seq_len, cfg.train.batch_size) == (1024, 8)
    assert cfg.train.compute_dtype == "bfloat16"
    assert cfg.train.engine is engine
    assert cfg.data.source == "synthetic"


def test_llama_tiny_config():
    cfg = load_config(CONFIGS_DIR / "llama-tiny.yaml")
    assert cfg.model == get_spec("llama-tiny")
    assert cfg.model.kv_heads < cfg.model.n_heads
