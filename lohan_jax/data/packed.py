"""Packed sequences (written by `lohan-jax prepare`): fixed rows of seq_len + 1 tokens, shuffled per epoch."""

from __future__ import annotations

import numpy as np

from lohan_jax.data.dataset import TokenDataset, _check_index, _check_positive

# Last entry of the rng key of the per-epoch permutations, so that they never share a key with anything else.
PERMUTATION_KEY_TAG = 0x7065726D  # "perm" in ASCII


class PackedDataset(TokenDataset):
    """Rows of R = seq_len + 1 tokens laid end to end (and an optional parallel loss mask); the last
    `eval_fraction` of the rows is held out.

    Training visits the other rows epoch by epoch, each epoch in a fresh permutation drawn from
    [seed, epoch]: sample g = (step * micro_batches + micro) * batch_size + i is row perm_e[g mod n] of epoch
    e = g div n. So every row is seen once per epoch, and a batch is a pure function of (seed, step, micro)
    for a fixed batch geometry: resuming at step k reads exactly the rows a run that never stopped would read.
    """

    def __init__(
        self,
        stream: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        micro_batches: int = 1,
        vocab_size: int | None = None,
        eval_fraction: float = 0.01,
        name: str = "packed",
        mask: np.ndarray | None = None,
    ):
        _check_positive("seq_len", seq_len)
        _check_positive("micro_batches", micro_batches)
        row = seq_len + 1
        if stream.ndim != 1 or len(stream) % row:
            raise ValueError(f"{name}: {len(stream)} tokens are not whole rows of seq_len + 1 = {row}; was it "
                             "packed for another seq_len?")
        n_rows = len(stream) // row
        n_eval_rows = int(n_rows * eval_fraction) if 0 < eval_fraction < 1 else 0
        if eval_fraction > 0 and n_eval_rows == 0:
            raise ValueError(f"{name}: {n_rows} sequences hold none for evaluation at eval_fraction={eval_fraction}; "
                             f"raise it to at least {1 / n_rows:.3g} or set it to 0 to disable evaluation")
        if n_rows - n_eval_rows < 1:
            raise ValueError(f"{name}: no training sequences left ({n_rows} in all, {n_eval_rows} held out)")
        super().__init__(stream, seq_len=seq_len, batch_size=batch_size, seed=seed, vocab_size=vocab_size,
                         eval_fraction=0.0, name=name, mask=mask)
        self.eval_fraction = float(eval_fraction)
        self.micro_batches = int(micro_batches)
        self.num_rows, self.num_eval_rows = n_rows, n_eval_rows
        self.num_train_rows = n_rows - n_eval_rows
        self.num_train_tokens, self.num_eval_tokens = self.num_train_rows * row, n_eval_rows * row
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def num_eval_windows(self) -> int:
        return self.num_eval_rows

    def sample_numbers(self, step: int, micro: int = 0) -> np.ndarray:
        """Global sample numbers g of batch (step, micro): how many sequences training drew before each one."""
        _check_index("step", step)
        _check_index("micro", micro)
        first = (step * self.micro_batches + micro) * self.batch_size
        return first + np.arange(self.batch_size, dtype=np.int64)

    def epoch(self, step: int) -> float:
        """Epochs over the training rows completed before `step` (fractional)."""
        return step * self.micro_batches * self.batch_size / self.num_train_rows

    def rows(self, step: int, micro: int = 0) -> np.ndarray:
        """Row numbers of training batch (step, micro)."""
        g = self.sample_numbers(step, micro)
        epochs, positions = np.divmod(g, self.num_train_rows)
        pairs = zip(epochs.tolist(), positions.tolist(), strict=True)
        return np.array([self._permutation(e)[p] for e, p in pairs], dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs; keep memory at two permutations
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch, PERMUTATION_KEY_TAG])
            self._permutations[epoch] = rng.permutation(self.num_train_rows)
        return self._permutations[epoch]

    def _train_index(self, step: int, micro: int) -> np.ndarray:
        return self.rows(step, micro) * (self.seq_len + 1)

    def _eval_index(self, batch_index: int) -> np.ndarray:
        rows = self.num_train_rows + (batch_index * self.batch_size + np.arange(self.batch_size)) % self.num_eval_rows
        return rows * (self.seq_len + 1)

    def __repr__(self) -> str:
        return (f"PackedDataset({self.name!r}, train_rows={self.num_train_rows}, eval_rows={self.num_eval_rows}, "
                f"seq_len={self.seq_len}, batch_size={self.batch_size}, masked={self.mask is not None})")
