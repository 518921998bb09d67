"""A training step's batch: micro-batches stacked on a leading axis, loss weights normalised over the step."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class BatchSource(Protocol):
    def batch(self, step: int, micro: int = 0) -> dict[str, np.ndarray]: ...


def step_batch(source: BatchSource, step: int, n_micro: int) -> dict[str, np.ndarray]:
    """tokens/targets int32 [M, b, S] and weights float32 [M, b, S] = loss_mask / valid tokens in the step.

    With these weights sum(weights * nll) over all micro-batches is the mean token loss of the whole step, so
    gradient accumulation gives exactly the gradient of one large batch.
    """
    micro = [source.batch(step, m) for m in range(n_micro)]
    tokens = np.stack([b["tokens"] for b in micro]).astype(np.int32)
    targets = np.stack([b["targets"] for b in micro]).astype(np.int32)
    mask = np.stack([b["loss_mask"] for b in micro]).astype(np.float32)
    n_valid = max(float(mask.sum()), 1.0)
    return {"tokens": tokens, "targets": targets, "weights": mask / np.float32(n_valid)}
