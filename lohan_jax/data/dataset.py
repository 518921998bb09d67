"""Token streams cut into deterministic training batches and a held-out evaluation tail."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# Tokens per chunk when scanning a stream for its largest id: 2**24 tokens is 32-64 MiB of host memory whatever
# the file size, and numpy's max runs at memory speed on it.
SCAN_CHUNK_TOKENS = 1 << 24

# Last entry of the rng key of synthetic eval batches. Non-zero on purpose: SeedSequence pads keys with zeros,
# so [seed, i, 0, 0] would equal the training key [seed, i, 0].
EVAL_KEY_TAG = 0x6576616C  # "eval" in ASCII


def windows_to_batch(windows_BT: np.ndarray, mask_BT: np.ndarray | None = None) -> Batch:
    """Splits windows of seq_len + 1 tokens into next-token inputs and targets.

    `mask_BT` (parallel to the windows, 1 = learn to predict this token) gives the loss mask of the targets,
    e.g. responses only for instruction data; without one every target counts.
    """
    windows_BT = windows_BT.astype(np.int32, copy=False)
    tokens_BS = windows_BT[:, :-1]
    if mask_BT is None:
        loss_mask = np.ones(tokens_BS.shape, dtype=np.float32)
    else:
        loss_mask = np.ascontiguousarray(mask_BT[:, 1:], dtype=np.float32)
    return dict(
        tokens=np.ascontiguousarray(tokens_BS),
        targets=np.ascontiguousarray(windows_BT[:, 1:]),
        loss_mask=loss_mask,
    )


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_index(name: str, value: int) -> None:
    # np.random.default_rng rejects negative keys with an obscure message; say which argument it was.
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


class TokenDataset:
    """A 1-D token stream (array or np.memmap) split into a training head and a held-out tail.

    Training batch (step, micro) is B windows of S + 1 tokens whose starts come from
    np.random.default_rng([seed, step, micro]), drawn so that every window lies inside the head; the last
    `eval_fraction` of the stream is read only by `eval_batches`, in order, with stride S. A batch is a pure
    function of (seed, step, micro): a run resumed at step k reads exactly the batches it would have read.
    `mask` (optional, parallel to the stream, 1 = learn to predict this token) becomes the batches' loss_mask.
    """

    def __init__(
        self,
        stream: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        vocab_size: int | None = None,
        eval_fraction: float = 0.01,
        name: str = "tokens",
        mask: np.ndarray | None = None,
    ):
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        _check_index("seed", seed)
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
        if vocab_size is not None:
            _check_positive("vocab_size", vocab_size)
        if stream.ndim != 1:
            raise ValueError(f"{name}: token stream must be 1-D, got shape {stream.shape}")
        if mask is not None and mask.shape != stream.shape:
            raise ValueError(f"{name}: the loss mask has {mask.shape[0]} entries but the stream has "
                             f"{stream.shape[0]} tokens")
        self.stream, self.mask = stream, mask
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.eval_fraction = float(eval_fraction)
        self.name = name
        self._declared_vocab_size = vocab_size
        self._max_token_id: int | None = None

        window_tokens = self.seq_len + 1
        self.num_eval_tokens = int(len(stream) * self.eval_fraction)
        self.num_train_tokens = len(stream) - self.num_eval_tokens
        if self.num_train_tokens < window_tokens:
            raise ValueError(
                f"{name}: the training split has {self.num_train_tokens} tokens ({len(stream)} in all, "
                f"{self.num_eval_tokens} held out) but one sequence needs seq_len + 1 = {window_tokens}; "
                "use more data or a shorter seq_len"
            )
        if self.eval_fraction > 0 and self.num_eval_tokens < window_tokens:
            raise ValueError(
                f"{name}: the held-out split (eval_fraction={self.eval_fraction}) has {self.num_eval_tokens} "
                f"tokens but one eval sequence needs seq_len + 1 = {window_tokens}; raise eval_fraction, "
                "shorten seq_len, or set eval_fraction to 0 to disable evaluation"
            )

    @property
    def num_eval_windows(self) -> int:
        """How many distinct eval sequences the held-out tail holds (stride seq_len)."""
        if self.num_eval_tokens == 0:
            return 0
        return (self.num_eval_tokens - 1) // self.seq_len

    @property
    def max_token_id(self) -> int:
        """Largest id in the stream, scanned in chunks once (a memmap is never loaded whole) and cached."""
        if self._max_token_id is None:
            self._max_token_id = max(
                int(self.stream[i : i + SCAN_CHUNK_TOKENS].max()) for i in range(0, len(self.stream), SCAN_CHUNK_TOKENS)
            )
        return self._max_token_id

    @property
    def vocab_size(self) -> int:
        """Declared vocab size (tokenizer or sidecar), else one more than the largest id in the stream."""
        if self._declared_vocab_size is not None:
            return self._declared_vocab_size
        return self.max_token_id + 1

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raises if any token id would index past the model's embedding table."""
        if self.max_token_id >= model_vocab_size:
            raise ValueError(
                f"{self.name}: max token id is {self.max_token_id} but the model's vocab_size is "
                f"{model_vocab_size}; the model needs vocab_size >= {self.max_token_id + 1} "
                f"(dataset vocab_size {self.vocab_size}), or re-tokenize with the model's tokenizer"
            )

    def batch(self, step: int, micro: int = 0) -> Batch:
        """Training batch for (seed, step, micro): tokens/targets int32[B, S], loss_mask float32[B, S]."""
        _check_index("step", step)
        _check_index("micro", micro)
        return self._batch_at(self._train_index(step, micro))

    def eval_batches(self, num_batches: int) -> Iterator[Batch]:
        """Yields `num_batches` batches from the held-out tail, the same ones on every call.

        When the tail holds fewer than num_batches * B windows they repeat cyclically (logged once), so a
        fixed eval budget still works on a small corpus; the mean loss is then a weighted one over the tail.
        """
        _check_index("num_batches", num_batches)
        if self.num_eval_windows == 0:
            raise ValueError(f"{self.name}: no held-out split (eval_fraction={self.eval_fraction})")
        if num_batches * self.batch_size > self.num_eval_windows:
            logger.warning(
                "%s: %d eval batches of %d need %d sequences but the held-out split holds %d; repeating them",
                self.name,
                num_batches,
                self.batch_size,
                num_batches * self.batch_size,
                self.num_eval_windows,
            )
        for batch_index in range(num_batches):
            yield self._batch_at(self._eval_index(batch_index))

    # A batch's index says which B windows it holds: their start offsets here, an rng key for synthetic data.
    def _train_index(self, step: int, micro: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, micro])
        # Exclusive high bound: the last start is num_train_tokens - (S + 1), so a window ends inside the head.
        return rng.integers(0, self.num_train_tokens - self.seq_len, size=self.batch_size)

    def _eval_index(self, batch_index: int) -> np.ndarray:
        window_index = (batch_index * self.batch_size + np.arange(self.batch_size)) % self.num_eval_windows
        return self.num_train_tokens + window_index * self.seq_len

    def _batch_at(self, starts: np.ndarray) -> Batch:
        mask = None if self.mask is None else self._windows_at(self.mask, starts)
        return windows_to_batch(self._windows_at(self.stream, starts), mask)

    def _windows_at(self, array: np.ndarray, starts: np.ndarray) -> np.ndarray:
        # One contiguous slice per row rather than a fancy index: a memmap then reads B sequential ranges.
        return np.stack([array[s : s + self.seq_len + 1] for s in starts.tolist()])

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.name!r}, train_tokens={self.num_train_tokens}, "
            f"eval_tokens={self.num_eval_tokens}, seq_len={self.seq_len}, batch_size={self.batch_size})"
        )


class SyntheticTokenDataset(TokenDataset):
    """Uniform random tokens in [0, vocab_size), endless and deterministic in (seed, step, micro).

    For benchmarks: no I/O, no tokenizer, every step costs the same. Eval batches use keys that training
    never draws, so they are "held out" in the only sense random data can be.
    """

    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, seed: int):
        _check_positive("vocab_size", vocab_size)
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        _check_index("seed", seed)
        self.stream = self.mask = None
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.eval_fraction = 0.0
        self.name = f"synthetic:{vocab_size}"
        self._declared_vocab_size = int(vocab_size)
        self._max_token_id = int(vocab_size) - 1
        self.num_train_tokens = self.num_eval_tokens = None  # endless

    @property
    def num_eval_windows(self) -> float:
        return float("inf")

    def _random_windows(self, key: list[int]) -> np.ndarray:
        rng = np.random.default_rng(key)
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32
        return rng.integers(0, self.vocab_size, size=(self.batch_size, self.seq_len + 1), dtype=dtype)

    def _train_index(self, step: int, micro: int) -> list[int]:
        return [self.seed, step, micro]

    def _eval_index(self, batch_index: int) -> list[int]:
        return [self.seed, batch_index, 0, EVAL_KEY_TAG]

    def _batch_at(self, key: list[int]) -> Batch:
        return windows_to_batch(self._random_windows(key))

    def __repr__(self) -> str:
        return (
            f"SyntheticTokenDataset(vocab_size={self.vocab_size}, seq_len={self.seq_len}, batch_size={self.batch_size})"
        )
