"""What a training run needs from Hugging Face checkpoints: its initial weights, and the export after the last
step. Called by train.run_training when hf.checkpoint / hf.export_dir are set."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lohan_jax.hf.checkpoint import HFCheckpoint, unit_trees
from lohan_jax.hf.config import spec_from_hf_config
from lohan_jax.hf.export import EXPORT_DTYPES, export_checkpoint

log = logging.getLogger(__name__)


def initial_params(cfg, streamed: bool) -> Any:
    """The checkpoint's fp32 weights for cfg.model: a callable unit(k) when `streamed` (the offload engine reads
    one unit at a time into its tiers), else the whole tree. Names, shards and shapes are checked first."""
    ckpt = HFCheckpoint(cfg.hf.checkpoint, spec=cfg.model)
    log.info("importing %s (%.2f GB of %s weights)", ckpt, ckpt.nbytes / 1e9, ckpt.dtype)
    if streamed:
        return ckpt.unit_params
    with ckpt:
        return ckpt.params()


def check_export_dir(cfg) -> None:
    """Before step 0: an export that would fail after hours of training fails now."""
    out = Path(cfg.hf.export_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"hf.export_dir={cfg.hf.export_dir!r} exists and is not an empty directory; choose a new "
                         "one (the export never overwrites)")


def _unit_masters(trainer) -> Callable[[int], Any]:
    """fp32 master weights unit by unit. The offload engine's units give theirs one at a time (no second copy of
    the model); other trainers give the whole tree."""
    if hasattr(trainer, "unit_master_params"):  # the offloaded engine: one unit in RAM at a time
        return trainer.unit_master_params
    return unit_trees(trainer.master_params()).__getitem__


def export_trained(cfg, trainer) -> Path:
    """Writes the trainer's weights to hf.export_dir: the source checkpoint's config.json and tokenizer files
    when there is one, else a config.json derived from cfg.model (and data.tokenizer if it is a tokenizer.json)."""
    hf_config, side_files, dtype = None, [], cfg.hf.export_dtype
    if cfg.hf.checkpoint:
        ckpt = HFCheckpoint(cfg.hf.checkpoint, spec=cfg.model)
        hf_config, side_files = ckpt.config, ckpt.side_files()
        if dataclasses.replace(spec_from_hf_config(hf_config), name=cfg.model.name) != cfg.model:
            log.warning("model.* overrides change the model that %s's config.json describes; the export's "
                        "config.json is derived from the model instead", cfg.hf.checkpoint)
            hf_config = None
        if dtype == "auto":
            dtype = ckpt.dtype if ckpt.dtype in EXPORT_DTYPES else "float32"
    else:
        tok = Path(cfg.data.tokenizer).expanduser()
        tok = tok / "tokenizer.json" if tok.is_dir() else tok
        side_files = [tok] if cfg.data.tokenizer not in ("", "byte") and tok.is_file() else []
    dtype = "float32" if dtype == "auto" else dtype
    out = export_checkpoint(cfg.model, _unit_masters(trainer), cfg.hf.export_dir, dtype=dtype,
                            max_shard_bytes=int(cfg.hf.export_shard_gib * 2**30), hf_config=hf_config,
                            side_files=side_files)
    log.info("exported %s weights to %s", dtype, out)
    return out
