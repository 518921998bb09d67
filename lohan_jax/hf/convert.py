"""Whole-model conversion between Hugging Face state dicts and our parameter trees, driven by the tensor table."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lohan_jax.hf.layout import HFLayout, Path, layout_of, tensor_table
from lohan_jax.models.spec import ModelSpec


def _dotted(path: Path) -> str:
    return ".".join(map(str, path))


def _canonical_index(layout: HFLayout, names: Any) -> dict[str, str]:
    """canonical HF name -> the name as given; two spellings of one tensor are an error, not a silent pick."""
    index: dict[str, str] = {}
    for name in names:
        canonical = layout.canonical_name(name)
        if canonical in index:
            raise ValueError(f"HF tensors {index[canonical]!r} and {name!r} are both {canonical!r}")
        index[canonical] = name
    return index


def _unflatten(leaves: dict[Path, np.ndarray], n_layers: int) -> dict[str, Any]:
    tree: dict[str, Any] = {"embed": {}, "blocks": [{} for _ in range(n_layers)], "head": {}}
    for path, leaf in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node[key] if isinstance(key, int) else node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    return {path: leaf for key, sub in items for path, leaf in _flatten(sub, (*prefix, key)).items()}


def params_from_hf(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Our fp32 parameter tree ({"embed", "blocks", "head"}, numpy leaves) from an HF state dict.

    `tensors` maps HF names to arrays, with or without the task-model prefix (`transformer.`, `model.decoder.`,
    `model.`); a tied model's `lm_head.weight` and known non-parameter buffers are skipped. Raises ValueError
    naming the tensor when one is missing, has the wrong shape, or is not part of `spec`'s model.
    """
    layout = layout_of(spec)
    given = _canonical_index(layout, tensors)
    leaves: dict[Path, np.ndarray] = {}
    for row in tensor_table(spec):
        name = given.pop(row.hf_name, None)
        if name is None:
            raise ValueError(f"missing HF tensor {row.hf_name!r} (for {_dotted(row.path)}; {layout.model_type} "
                             f"layout, {spec.n_layers} layers, tie_embeddings={spec.tie_embeddings})")
        a = np.asarray(tensors[name])
        if a.shape != row.hf_shape:
            raise ValueError(f"HF tensor {name!r} has shape {a.shape}, expected {row.hf_shape} for spec {spec.name!r}")
        if row.path not in leaves:
            leaves[row.path] = np.empty(row.leaf_shape, np.float32)
        leaves[row.path][row.slot] = row.layout.to_ours(a).astype(np.float32, copy=False)
    unexpected = sorted(given[c] for c in given if not layout.is_skipped(spec, c))
    if unexpected:
        raise ValueError(f"HF tensors not in spec {spec.name!r} ({layout.model_type} layout, {spec.n_layers} layers): "
                         f"{', '.join(map(repr, unexpected[:8]))}{' ...' if len(unexpected) > 8 else ''}")
    return _unflatten(leaves, spec.n_layers)


def params_to_hf(spec: ModelSpec, params: Any) -> dict[str, np.ndarray]:
    """HF tensors (the *ForCausalLM class's names and layouts, C-contiguous, params' dtype) from our tree.

    A tied model gets no `lm_head.weight`, as in `named_parameters()` and HF's safetensors files.
    """
    leaves = _flatten(params)
    rows = tensor_table(spec)
    extra = sorted(set(leaves) - {row.path for row in rows}, key=_dotted)
    if extra:
        raise ValueError(f"params leaves not in spec {spec.name!r}: {', '.join(map(_dotted, extra[:8]))}")
    arrays: dict[Path, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for row in rows:
        if row.path not in leaves:
            raise ValueError(f"params lack {_dotted(row.path)} (HF tensor {row.hf_name!r})")
        if row.path not in arrays:
            arrays[row.path] = np.asarray(leaves[row.path])
            if arrays[row.path].shape != row.leaf_shape:
                raise ValueError(f"params {_dotted(row.path)} has shape {arrays[row.path].shape}, "
                                 f"expected {row.leaf_shape} (HF tensor {row.hf_name!r})")
        out[row.hf_name] = np.ascontiguousarray(row.layout.to_hf(arrays[row.path][row.slot]))
    return out
