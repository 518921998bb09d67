"""Hugging Face checkpoint directories (config.json + one or sharded safetensors files), read one unit at a time.

`HFCheckpoint(dir).unit_params(k)` returns the fp32 tree of unit k (0 embedding, 1..L blocks, L+1 head) read
tensor by tensor through `tensor_table`, which is the callable `OffloadEngine` accepts: the engine copies each
unit into its planned tier before asking for the next, so importing a 13B model holds the engine's state plus one
unit's fp32 copy, never a second copy of the model. Every name, shard and shape is checked from the headers alone
before any tensor is read, so a bad checkpoint fails in a second with the tensor named, not after an hour.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lohan_jax.hf.config import spec_from_hf_config
from lohan_jax.hf.layout import Path as LeafPath
from lohan_jax.hf.layout import TensorMap, layout_of, tensor_table
from lohan_jax.hf.tensorfile import DTYPES, SafetensorsReader, TensorInfo, read_header
from lohan_jax.models.spec import ModelSpec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files next to the weights that a tokenizer or generation needs; export copies those the source has.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory, with errors that say what a checkpoint directory holds."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ValueError(f"HF checkpoint {str(directory)!r} is not a directory; expected a directory written by "
                         "transformers' save_pretrained (config.json + model.safetensors)")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"HF checkpoint {directory} has no {CONFIG_NAME}; expected a directory written by "
                         "transformers' save_pretrained")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def spec_from_checkpoint(directory: str | os.PathLike) -> ModelSpec:
    """The ModelSpec of a checkpoint directory; named after the directory (run directories use the name)."""
    config = read_hf_config(directory)
    try:
        spec = spec_from_hf_config(config)
    except ValueError as e:
        raise ValueError(f"HF checkpoint {directory}: {e}") from None
    return dataclasses.replace(spec, name=Path(directory).expanduser().resolve().name)


def unit_of(path: LeafPath, n_layers: int) -> int:
    """Forward-order unit index of a leaf path: 0 embedding, 1..L blocks, L+1 head."""
    return {"embed": 0, "head": n_layers + 1}[path[0]] if path[0] != "blocks" else 1 + int(path[1])


def _unit_prefix(path: LeafPath) -> int:
    """How many leading keys of a leaf path name its unit (("blocks", 3) for blocks, ("embed",) otherwise)."""
    return 2 if path[0] == "blocks" else 1


def _weight_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the file holding it, from the index (sharded) or the single weights file."""
    index_path, single = directory / INDEX_NAME, directory / WEIGHTS_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map; is it a safetensors index?")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise ValueError(f"HF checkpoint {directory} is incomplete: {len(missing)} of the {len(shards)} shards "
                             f"that {INDEX_NAME} lists are missing: {', '.join(missing)}")
        return {name: directory / shard for name, shard in weight_map.items()}
    if single.is_file():
        return {name: single for name in read_header(single)[0]}
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".h5"))
    if any(name.endswith(".bin") or name.endswith(".pt") for name in found):
        raise ValueError(f"HF checkpoint {directory} holds only PyTorch pickles ({', '.join(found)}); we read "
                         "safetensors only: load it in transformers and save_pretrained(dir, safe_serialization=True)")
    raise ValueError(f"HF checkpoint {directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}"
                     + (f" (found {', '.join(found)})" if found else ""))


class HFCheckpoint:
    """A checkpoint directory opened for reading: its config, spec, tensor headers and open shard files."""

    def __init__(self, directory: str | os.PathLike, spec: ModelSpec | None = None):
        """Reads config.json and every shard header; checks names and shapes against `spec` (default: the
        spec config.json describes). Raises ValueError naming the shard or tensor at fault."""
        self.directory = Path(directory).expanduser()
        self.config = read_hf_config(self.directory)
        self.spec = spec if spec is not None else spec_from_checkpoint(self.directory)
        self._files = _weight_files(self.directory)
        self._headers: dict[Path, dict[str, TensorInfo]] = {f: read_header(f)[0] for f in set(self._files.values())}
        self._readers: dict[Path, SafetensorsReader] = {}
        self._rows = self._check()

    # ---- validation, from headers only ---------------------------------------------------------------------
    def _check(self) -> list[tuple[TensorMap, str]]:
        """(row, name in the file) for every tensor of the spec; raises naming missing, misshapen, extra ones."""
        spec, layout = self.spec, layout_of(self.spec)
        where = f"HF checkpoint {self.directory}"
        for name, file in self._files.items():
            if name not in self._headers[file]:
                raise ValueError(f"{where}: {INDEX_NAME} puts tensor {name!r} in {file.name}, which does not hold it")
        given: dict[str, str] = {}
        for name in self._files:
            canonical = layout.canonical_name(name)
            if canonical in given:
                raise ValueError(f"{where}: tensors {given[canonical]!r} and {name!r} are both {canonical!r}")
            given[canonical] = name
        rows = []
        for row in tensor_table(spec):
            name = given.pop(row.hf_name, None)
            if name is None:
                raise ValueError(f"{where} lacks tensor {row.hf_name!r} ({layout.model_type} layout, "
                                 f"{spec.n_layers} layers, tie_embeddings={spec.tie_embeddings})")
            info = self._headers[self._files[name]][name]
            if info.shape != row.hf_shape:
                raise ValueError(f"{where}: tensor {name!r} in {self._files[name].name} has shape {info.shape}, "
                                 f"expected {row.hf_shape} for the model config.json describes "
                                 f"(d_model={spec.d_model}, vocab_size={spec.vocab_size}, d_ff={spec.ff_dim})")
            if not info.dtype.startswith(("F", "BF")):
                raise ValueError(f"{where}: tensor {name!r} has dtype {info.dtype}, not a floating type")
            rows.append((row, name))
        unexpected = sorted(given[c] for c in given if not layout.is_skipped(spec, c))
        if unexpected:
            raise ValueError(f"{where} has tensors that the {layout.model_type} model of {spec.n_layers} layers does "
                             f"not use: {', '.join(map(repr, unexpected[:8]))}{' ...' if len(unexpected) > 8 else ''}"
                             "; does config.json match the weights?")
        return rows

    @property
    def dtype(self) -> str:
        """The stored floating dtype of the weights, as a numpy name ("bfloat16", "float32", ...)."""
        row, name = self._rows[0]
        return str(DTYPES[self._headers[self._files[name]][name].dtype])

    @property
    def nbytes(self) -> int:
        return sum(self._headers[self._files[name]][name].nbytes for _, name in self._rows)

    # ---- reading -----------------------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """One tensor as stored in the checkpoint (its dtype and HF layout)."""
        file = self._files[name]
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(file)
        return self._readers[file].read(name)

    def unit_params(self, k: int) -> dict[str, Any]:
        """fp32 tree of unit k (0 embedding, 1..L blocks, L+1 head), converted tensor by tensor."""
        n_units = self.spec.n_layers + 2
        if not 0 <= k < n_units:
            raise IndexError(f"unit {k} out of range: the model has {n_units} units (embedding, blocks, head)")
        tree: dict[str, Any] = {}
        for row, name in self._rows:
            if unit_of(row.path, self.spec.n_layers) != k:
                continue
            node = tree
            keys = row.path[_unit_prefix(row.path):]
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            if keys[-1] not in node:
                node[keys[-1]] = np.empty(row.leaf_shape, np.float32)
            node[keys[-1]][row.slot] = row.layout.to_ours(self.read(name).astype(np.float32))
        if k == n_units - 1:  # the engine reads units in order: the last one closes the files (reads reopen them)
            self.close()
        return tree

    def params(self) -> dict[str, Any]:
        """The whole fp32 tree ({"embed", "blocks", "head"}); for the reference trainer and small models."""
        units = [self.unit_params(k) for k in range(self.spec.n_layers + 2)]
        return {"embed": units[0], "blocks": units[1:-1], "head": units[-1]}

    def side_files(self) -> list[Path]:
        """Tokenizer and generation files next to the weights (copied on export)."""
        return [self.directory / n for n in SIDE_FILES if (self.directory / n).is_file()]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.directory)!r}, {self.spec.name!r}, {len(self._rows)} tensors, {self.dtype})"


def unit_trees(params: Mapping[str, Any]) -> list[Any]:
    """A whole parameter tree as its list of unit trees in forward order."""
    return [params["embed"], *params["blocks"], params["head"]]
