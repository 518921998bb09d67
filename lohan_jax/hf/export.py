"""Export of our weights as a Hugging Face checkpoint directory that transformers' from_pretrained loads.

The layout is the one save_pretrained writes: `model.safetensors`, or above the shard size
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, next to config.json (and the tokenizer
files when given). Shard boundaries are planned from the tensor table before any weight is read, so each header
is written first and each unit's tensors are streamed after it: export holds one unit of the model at a time.
The directory appears atomically: everything is written into a sibling temporary directory, then renamed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lohan_jax.hf.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, unit_of, unit_trees
from lohan_jax.hf.config import hf_config_from_spec
from lohan_jax.hf.layout import TensorMap, tensor_table
from lohan_jax.hf.tensorfile import SafetensorsWriter, dtype_code
from lohan_jax.models.spec import ModelSpec

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers 4.x's save_pretrained default ("5GB")


def plan_shards(rows: list[TensorMap], itemsize: int, max_shard_bytes: int) -> list[list[TensorMap]]:
    """Consecutive rows cut into shards of at most max_shard_bytes (a tensor larger than that gets its own)."""
    shards: list[list[TensorMap]] = [[]]
    size = 0
    for row in rows:
        nbytes = math.prod(row.hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _leaf(tree: Any, keys: tuple) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def _config_for_export(spec: ModelSpec, hf_config: Mapping[str, Any] | None, dtype: str) -> dict[str, Any]:
    config = dict(hf_config) if hf_config is not None else hf_config_from_spec(spec, dtype)
    for key in ("torch_dtype", "dtype"):  # transformers 4 writes torch_dtype, 5 writes dtype
        if key in config or key == "torch_dtype" and "dtype" not in config:
            config[key] = dtype
    return config


def export_checkpoint(spec: ModelSpec, params: Callable[[int], Any] | Mapping[str, Any], out_dir: str | os.PathLike,
                      *, dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      hf_config: Mapping[str, Any] | None = None, side_files: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False) -> Path:
    """Writes `spec`'s weights to `out_dir` as an HF checkpoint; returns `out_dir`.

    `params` is a whole fp32 tree or a callable `unit(k)` giving unit k's tree (0 embedding, 1..L blocks, L+1
    head), called once per unit in order. `hf_config` is the source checkpoint's config.json (kept, with its
    dtype updated) or None to derive one from `spec`. `side_files` (tokenizer files) are copied next to it.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"export directory {out_dir} exists and is not empty; choose another or allow overwriting")
    unit = params if callable(params) else unit_trees(params).__getitem__
    np_dtype = EXPORT_DTYPES[dtype]
    rows = sorted(tensor_table(spec), key=lambda r: unit_of(r.path, spec.n_layers))  # stable: table order kept
    shards = plan_shards(rows, np_dtype.itemsize, max_shard_bytes)
    names = _shard_names(len(shards))
    shard_of = {row.hf_name: i for i, shard in enumerate(shards) for row in shard}

    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer, current = None, -1
        for k in range(spec.n_layers + 2):
            tree = unit(k)
            for row in (r for r in rows if unit_of(r.path, spec.n_layers) == k):
                if shard_of[row.hf_name] != current:
                    if writer is not None:
                        writer.close()
                    current = shard_of[row.hf_name]
                    writer = SafetensorsWriter(
                        tmp / names[current], [(r.hf_name, dtype_code(np_dtype), r.hf_shape) for r in shards[current]],
                        metadata={"format": "pt"})
                keys = row.path[2:] if row.path[0] == "blocks" else row.path[1:]
                leaf = np.asarray(_leaf(tree, keys))
                if leaf.shape != row.leaf_shape:
                    raise ValueError(f"unit {k}: {'.'.join(map(str, row.path))} has shape {leaf.shape}, expected "
                                     f"{row.leaf_shape} (HF tensor {row.hf_name!r})")
                writer.write(row.hf_name, row.layout.to_hf(leaf[row.slot]).astype(np_dtype))
            del tree
        if writer is not None:
            writer.close()
        if len(shards) > 1:
            total = sum(math.prod(r.hf_shape) for r in rows) * np_dtype.itemsize
            weight_map = {name: names[shard_of[name]] for name in sorted(shard_of)}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = _config_for_export(spec, hf_config, dtype)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in side_files:
            shutil.copy2(f, tmp / Path(f).name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
