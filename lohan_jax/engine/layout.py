"""Flat layout of a unit's parameter tree: one contiguous buffer per unit, one transfer per unit.

A block's weights, gradients, fp32 master and Adam moments are each one flat vector; the jitted programs
slice and reshape the flat vector back into the tree (a cheap on-device copy) so that PCIe sees one large
transfer per unit instead of a dozen small ones.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # start of each leaf; offsets[-1] == size
    decay: tuple[bool, ...]  # weight decay applies to this leaf (matrices yes; norms and biases no)

    @classmethod
    def of(cls, tree: Any) -> FlatLayout:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        offsets = tuple(int(x) for x in np.cumsum([0] + [math.prod(s) for s in shapes]))
        return cls(treedef, shapes, offsets, tuple(len(s) >= 2 for s in shapes))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def flatten_np(self, tree: Any, dtype: Any = np.float32) -> np.ndarray:
        leaves = jax.tree.leaves(tree)
        return np.concatenate([np.asarray(leaf, dtype=dtype).reshape(-1) for leaf in leaves]) if leaves else \
            np.zeros((0,), dtype)

    def flatten(self, tree: Any) -> jax.Array:
        """Inside jit: tree -> flat vector."""
        return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(tree)])

    def unflatten(self, flat: Any) -> Any:
        """flat vector (jax or numpy) -> tree of views/slices."""
        leaves = [flat[a:b].reshape(s) for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]
        return jax.tree.unflatten(self.treedef, leaves)

    def segments(self, weight_decay: float) -> tuple[np.ndarray, np.ndarray]:
        """(bounds int64[n+1], decay float32[n]) for the host AdamW kernel."""
        return np.asarray(self.offsets, np.int64), self.leaf_decay(weight_decay)

    def leaf_decay(self, weight_decay: float) -> np.ndarray:
        """Weight decay per leaf (float32[n_leaves])."""
        return np.asarray([weight_decay if d else 0.0 for d in self.decay], np.float32)

    def decay_vector(self, per_leaf: jax.Array) -> jax.Array:
        """Inside jit: per-element weight decay from the per-leaf values. `per_leaf` must be a runtime argument:
        as a constant, XLA folds the repeat into an n-element literal (50 s to compile a 64M-element leaf)."""
        sizes = np.diff(np.asarray(self.offsets))
        return jnp.repeat(per_leaf, sizes, total_repeat_length=self.size)
