"""Run configuration: frozen dataclasses per concern, YAML files, dotted overrides, strict validation."""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lohan_jax.models.registry import REGISTRY, get_spec
from lohan_jax.models.spec import ModelSpec


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


class Schedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # linear warmup, then cosine decay to min_lr_ratio * lr at train.steps


class OnNonFinite(str, enum.Enum):
    """What a step with a non-finite loss or gradient norm does (lohan_jax.engine.guard explains the check)."""

    SKIP = "skip"  # apply none of its updates (weights, moments and Adam's step count unchanged), log it, go on
    STOP = "stop"  # apply none of its updates and stop the run with an error naming the step and block
    OFF = "off"  # no check: the update is applied, NaN and all (no per-step host sync; for benchmarks)


class EngineKind(str, enum.Enum):
    OFFLOAD = "offload"  # block-by-block engine with host-resident state (the main path)
    REFERENCE = "reference"  # whole-model value_and_grad + optax.adamw, everything in device memory


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with optax semantics (decoupled weight decay masked off norms and biases)."""

    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: Schedule = Schedule.COSINE
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr of the cosine schedule, as a fraction of lr
    clip_norm: float = 0.0  # clip_by_global_norm threshold; 0 turns clipping off

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", (self.b1, self.b2), "must be in [0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.clip_norm >= 0, "optim.clip_norm", self.clip_norm, "must be >= 0 (0 = off)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from: builtin:pydoc, a .txt file or folder, a .bin token file, or synthetic:."""

    source: str = "builtin:pydoc"
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    token_dtype: str = ""  # for .bin token files without a sidecar .json: uint16 or uint32
    eval_fraction: float = 0.05  # tail of the token stream held out for evaluation

    def __post_init__(self):
        _check(0 <= self.eval_fraction < 1, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _check(self.token_dtype in ("", "uint16", "uint32"), "data.token_dtype", self.token_dtype,
               "must be uint16 or uint32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, batch geometry, precision, logging."""

    steps: int = 200
    batch_size: int = 16  # sequences per optimizer step
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many micro-batches
    seq_len: int = 128
    seed: int = 0
    compute_dtype: str = "auto"  # bfloat16, float32, or auto (bfloat16 on GPU, float32 on CPU)
    engine: EngineKind = EngineKind.OFFLOAD  # the main path; reference = all-in-HBM optax baseline
    attention: str = "auto"  # auto, xla or cudnn
    log_every: int = 1  # write a metrics row every this many steps (the last step always)
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    run_dir: str = "runs"  # each run writes into run_dir/<model>-<timestamp>/
    checkpoint_every: int = 0  # save an orbax checkpoint every N steps and at the end (0 = never)
    keep_checkpoints: int = 3  # newest checkpoints kept
    checkpoint_at_end: bool = True  # with checkpoint_every: also save after the last step when it is not a multiple
    checkpoint_async: bool = True  # write checkpoints behind training (False: each save blocks until committed)
    deterministic: bool = False  # XLA's deterministic GPU ops: bit-identical reruns and resumes (lohan_jax.determinism)
    on_nonfinite: OnNonFinite = OnNonFinite.SKIP  # a step whose loss or gradient norm is NaN/inf: skip, stop, off

    def checkpoint_steps(self, start: int = 0) -> list[int]:
        """The steps after `start` whose end saves a checkpoint (every N steps, and the last one if
        checkpoint_at_end)."""
        if not self.checkpoint_every:
            return []
        return [s for s in range(start + 1, self.steps + 1)
                if s % self.checkpoint_every == 0 or (self.checkpoint_at_end and s == self.steps)]

    def __post_init__(self):
        for key in ("steps", "batch_size", "micro_batches", "seq_len", "log_every", "eval_batches"):
            _check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "must be > 0")
        _check(self.seed >= 0, "train.seed", self.seed, "must be >= 0")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = never)")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0 (0 = only at the end)")
        _check(self.batch_size % self.micro_batches == 0, "train.micro_batches", self.micro_batches,
               f"must divide train.batch_size={self.batch_size}")
        _check(self.compute_dtype in ("auto", "bfloat16", "float32"), "train.compute_dtype", self.compute_dtype,
               "must be auto, bfloat16 or float32")
        _check(self.attention in ("auto", "xla", "cudnn"), "train.attention", self.attention,
               "must be auto, xla or cudnn")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.micro_batches


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """The offloaded engine's plan: the planner's (auto), a plan JSON file, or a uniform plan from the fields below."""

    plan: str = "auto"  # auto: the planner decides on a GPU (on the CPU the uniform fields apply) | uniform
    machine: str = ""  # auto's machine: a built-in name or a profile file; "" = this GPU's profile, live capacities
    plan_file: str = ""  # a plan saved as JSON (Plan.save); overrides plan and the uniform fields
    weights: str = "host"  # bf16 weights of the blocks: host (streamed each use) or hbm (resident)
    optim_state: str = "host"  # fp32 master + Adam moments of the blocks: host / disk (CPU AdamW), hbm (GPU AdamW)
    disk_path: str = ""  # directory for optimizer state on disk (TensorStore); needed when any state is on disk
    disk_io_mode: str = "default"  # the disk state's file I/O: default (page cache) or direct (lohan_jax.tiers.store)
    disk_io_concurrency: int = 8  # TensorStore file operations in flight on the disk state
    activations: str = "recompute"  # keep | recompute | save:name1,name2 ; optionally +swap, +swap_input
    edges_on_gpu: bool = True  # embedding and head resident in HBM and updated there
    prefetch_depth: int = 2  # weight and activation uploads issued this many blocks ahead
    keep_turn_blocks: int = 1  # last blocks kept on the GPU from forward to backward
    # disk-resident state: reordered (reads issued ahead of the updates) or naive (each read issued as its update
    # starts, behind the previous write: the paper's naive order, for the ablation). Applies to auto and uniform
    # plans and to `lohan-jax plan --out`; a plan file carries its own (Plan.disk_io_order)
    disk_io_order: str = "reordered"
    host_threads: int = 0  # host AdamW threads; 0 = all cores but one (the dispatching thread keeps one)
    hbm_budget_gib: float = 0.0  # GPU memory the plan may use; 0 = what the device reports
    host_budget_gib: float = 0.0  # host RAM the plan may use; 0 = MemAvailable (cgroup-aware)
    timeline_step: int = -1  # record this step's timeline (trace JSON + PNG in the run dir); -1 = none
    devices: int = 1  # GPUs of this host, data parallel (batch split, optimizer state sharded across them)

    def __post_init__(self):
        _check(self.plan in ("auto", "uniform"), "offload.plan", self.plan,
               "must be auto (the planner decides) or uniform (the fields of offload.*)")
        _check(self.weights in ("host", "hbm"), "offload.weights", self.weights, "must be host or hbm")
        _check(self.optim_state in ("host", "hbm", "disk"), "offload.optim_state", self.optim_state,
               "must be host, hbm or disk")
        _check(self.optim_state != "disk" or bool(self.disk_path), "offload.disk_path", self.disk_path,
               "must name a directory when offload.optim_state=disk")
        _check(self.disk_io_mode in ("default", "direct"), "offload.disk_io_mode", self.disk_io_mode,
               "must be default (buffered, through the page cache) or direct (O_DIRECT reads, no cached pages)")
        _check(self.disk_io_concurrency >= 1, "offload.disk_io_concurrency", self.disk_io_concurrency, "must be >= 1")
        _check(self.prefetch_depth >= 1, "offload.prefetch_depth", self.prefetch_depth, "must be >= 1")
        _check(self.keep_turn_blocks >= 0, "offload.keep_turn_blocks", self.keep_turn_blocks, "must be >= 0")
        _check(self.disk_io_order in ("reordered", "naive"), "offload.disk_io_order", self.disk_io_order,
               "must be reordered (disk reads issued ahead of the updates) or naive (each read as its update starts)")
        _check(self.host_threads >= 0, "offload.host_threads", self.host_threads, "must be >= 0")
        _check(self.hbm_budget_gib >= 0, "offload.hbm_budget_gib", self.hbm_budget_gib, "must be >= 0 (0 = device)")
        _check(self.host_budget_gib >= 0, "offload.host_budget_gib", self.host_budget_gib, "must be >= 0 (0 = RAM)")
        _check(self.devices >= 1, "offload.devices", self.devices, "must be >= 1")
        try:
            from lohan_jax.plan import ActivationPolicy
            ActivationPolicy.parse(self.activations)
        except ValueError as e:
            raise ConfigError(f"offload.activations: {e}") from None


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """Hugging Face checkpoints: start from one, and write the trained weights back as one (lohan_jax.hf)."""

    checkpoint: str = ""  # HF checkpoint directory to start from; its config.json gives the model ("" = random init)
    export_dir: str = ""  # after the last step, write the weights here as an HF checkpoint ("" = no export)
    export_dtype: str = "auto"  # auto (the checkpoint's dtype, else float32), float32, bfloat16 or float16
    export_shard_gib: float = 5.0  # safetensors shards of at most this size (save_pretrained's default)

    def __post_init__(self):
        _check(self.export_dtype in ("auto", "float32", "bfloat16", "float16"), "hf.export_dtype",
               self.export_dtype, "must be auto, float32, bfloat16 or float16")
        _check(self.export_shard_gib > 0, "hf.export_shard_gib", self.export_shard_gib, "must be > 0")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSpec = dataclasses.field(default_factory=lambda: get_spec("gpt-small"))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    offload: OffloadConfig = dataclasses.field(default_factory=OffloadConfig)
    hf: HFConfig = dataclasses.field(default_factory=HFConfig)

    def __post_init__(self):
        _check(self.train.seq_len <= self.model.max_seq_len,
               "train.seq_len", self.train.seq_len, f"exceeds model.max_seq_len={self.model.max_seq_len}")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {why}")


# ---- loading -------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from an optional YAML file plus `key.sub=value` overrides (values parsed as YAML scalars)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (or is not a file)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read as UTF-8 text: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-4")
        keys = key.strip().split(".")
        if not all(k.strip() for k in keys):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like section.key")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
        _set_dotted(raw, keys, parsed)
    return config_from_dict(raw)


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override key {'.'.join(keys)!r}: {k!r} is a value, not a section")
    node[keys[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    _reject_unknown(raw, sections, "")
    kwargs = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {value!r}")
        if name != "model":
            kwargs[name] = _from_dict(_SECTION_TYPES[name], value, name)
    checkpoint = kwargs["hf"].checkpoint if "hf" in kwargs else ""
    if "model" in raw or checkpoint:  # hf.checkpoint first: with one, config.json describes the model
        kwargs["model"] = _model_from_dict(raw.get("model", {}), checkpoint)
    return Config(**kwargs)


_SECTION_TYPES = {"train": TrainConfig, "optim": OptimConfig, "data": DataConfig, "offload": OffloadConfig,
                  "hf": HFConfig}


def _model_from_dict(raw: dict[str, Any], hf_checkpoint: str = "") -> ModelSpec:
    raw = dict(raw)
    if hf_checkpoint:
        return _model_from_checkpoint(raw, hf_checkpoint)
    name = raw.pop("name", "gpt-small")
    fields = {f.name: f for f in dataclasses.fields(ModelSpec)}
    _reject_unknown(raw, fields, "model.")
    hints = typing.get_type_hints(ModelSpec)
    fields = {k: _coerce(v, hints[k], f"model.{k}") for k, v in raw.items()}
    try:
        if str(name) not in REGISTRY and "arch" in fields:  # a fully described custom model
            return ModelSpec(name=str(name), **fields)
        return get_spec(str(name), **fields)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _model_from_checkpoint(raw: dict[str, Any], hf_checkpoint: str) -> ModelSpec:
    """The spec of hf.checkpoint's config.json (named after its directory); model.* keys replace its fields."""
    from lohan_jax.hf.checkpoint import spec_from_checkpoint

    _reject_unknown(raw, {f.name: f for f in dataclasses.fields(ModelSpec)}, "model.")
    hints = typing.get_type_hints(ModelSpec)
    try:
        return dataclasses.replace(spec_from_checkpoint(hf_checkpoint),
                                   **{k: _coerce(v, hints[k], f"model.{k}") for k, v in raw.items()})
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"hf.checkpoint: {e}") from None


def _from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, prefix + ".")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in raw.items()})


def _reject_unknown(raw: dict, known: dict, prefix: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a YAML value against the field's annotation; ints are accepted for floats."""
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        try:
            return typ(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not one of {[e.value for e in typ]}") from None
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(typ):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {typ}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-4" (no dot) as a string
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {typ.__name__}, got {type(value).__name__}")
    return value


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dict (enums as values) for YAML/JSON; round-trips through config_from_dict."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Written whole or not at all (a run killed here must still resume from its config.yaml)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
