"""Where token streams come from: the built-in pydoc corpus, text files, .bin token files, random tokens."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from lohan_jax.data.dataset import SyntheticTokenDataset, TokenDataset
from lohan_jax.data.packed import PackedDataset
from lohan_jax.data.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}

SOURCES_ACCEPTED = (
    "'builtin:pydoc', 'synthetic' or 'synthetic:VOCAB_SIZE', a .txt file, a directory of .txt files, "
    "or a .bin file of uint16/uint32 token ids (e.g. packed by `lohan-jax prepare`)"
)


def pydoc_documents() -> list[str]:
    """The help topics CPython ships in pydoc_data.topics (~0.47 MB of English), one document per topic.

    Sorted by key because dict order is an implementation detail and the corpus must be the same everywhere.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {"pydoc": pydoc_documents}


def stream_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Smallest dtype that holds every id; uint16 halves host memory for vocabularies up to 65,536."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """Tokenizes each document and ends it with eos, so the model learns where documents stop."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces = [piece for doc in documents for piece in (tokenizer.encode(doc), eos)]
    if not pieces:
        return np.zeros(0, dtype=stream_dtype(tokenizer.vocab_size))
    return np.concatenate(pieces).astype(stream_dtype(tokenizer.vocab_size))


def _text_files_under(path: Path) -> list[Path]:
    """The .txt file itself, or every .txt below a directory in sorted order (the stream is order-dependent)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"directory {path} holds no .txt files; expected a directory of .txt files")
    return files


def _read_text(path: Path) -> str:
    """Reads UTF-8 text, turning a decode error into one that names the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _read_sidecar(bin_path: Path) -> tuple[dict, Path | None]:
    """Reads `data.bin.json` (or `data.json`) next to `data.bin`; ({}, None) when there is none."""
    for sidecar in (bin_path.with_name(bin_path.name + ".json"), bin_path.with_suffix(".json")):
        if sidecar.is_file():
            return json.loads(sidecar.read_text()), sidecar
    return {}, None


def _resolve(field: str, explicit, from_sidecar, sidecar: Path | None, bin_path: Path):
    if explicit is not None and from_sidecar is not None and explicit != from_sidecar:
        raise ValueError(f"{field}={explicit!r} was passed but {sidecar} says {from_sidecar!r} for {bin_path}")
    return explicit if explicit is not None else from_sidecar


def _resolve_vocab(model_vocab_size: int | None, from_sidecar: int | None, sidecar: Path | None, bin_path: Path):
    """The data's vocabulary may be smaller than the model's (padded embedding tables are common), never larger."""
    if model_vocab_size is not None and from_sidecar is not None and model_vocab_size < from_sidecar:
        raise ValueError(
            f"vocab_size={model_vocab_size} was passed but {sidecar} says {from_sidecar} for {bin_path}: the data was "
            f"tokenized with a vocabulary of {from_sidecar} ids, larger than the model's {model_vocab_size}; "
            "tokenize it with the model's tokenizer (lohan-jax prepare --tokenizer <model dir>/tokenizer.json)"
        )
    return from_sidecar if from_sidecar is not None else model_vocab_size


def open_token_file(bin_path: Path, *, token_dtype: str | None, vocab_size: int | None) -> tuple[np.memmap, int | None]:
    """Maps a raw .bin of token ids read-only; dtype and vocab size come from the arguments or the sidecar.

    `vocab_size` is the model's: a sidecar may declare a smaller vocabulary, not a larger one.
    """
    sidecar_fields, sidecar = _read_sidecar(bin_path)
    dtype_name = _resolve("token_dtype", token_dtype, sidecar_fields.get("dtype"), sidecar, bin_path)
    vocab_size = _resolve_vocab(vocab_size, sidecar_fields.get("vocab_size"), sidecar, bin_path)
    if dtype_name is None:
        raise ValueError(
            f'token file {bin_path} has no sidecar {bin_path.name}.json with a "dtype"; write one, e.g. '
            '{"dtype": "uint16", "vocab_size": 50257}, or pass token_dtype ("uint16" or "uint32")'
        )
    if dtype_name not in TOKEN_DTYPES:
        raise ValueError(f"token dtype {dtype_name!r} for {bin_path} is not one of {sorted(TOKEN_DTYPES)}")
    dtype = np.dtype(TOKEN_DTYPES[dtype_name])
    nbytes = bin_path.stat().st_size
    if nbytes % dtype.itemsize:
        raise ValueError(
            f"token file {bin_path} is {nbytes} bytes, not a whole number of {dtype_name} tokens; is the dtype right?"
        )
    if nbytes == 0:
        raise ValueError(f"token file {bin_path} is empty")
    return np.memmap(bin_path, dtype=dtype, mode="r"), vocab_size


def open_mask_file(mask_path: Path, n_tokens: int) -> np.memmap:
    """Maps a loss-mask file (uint8, one entry per token, 1 = learn to predict the token) read-only."""
    if not mask_path.is_file():
        raise ValueError(f"loss-mask file {mask_path} named by the sidecar does not exist")
    if mask_path.stat().st_size != n_tokens:
        raise ValueError(f"loss-mask file {mask_path} has {mask_path.stat().st_size} entries but its token file "
                         f"{n_tokens}; prepare the data again")
    return np.memmap(mask_path, dtype=np.uint8, mode="r")


def _open_bin(path: Path, *, seq_len: int, token_dtype: str | None, vocab_size: int | None, micro_batches: int,
              tokenizer, **kw) -> TokenDataset:
    """A .bin token file: a packed one (its sidecar names a seq_len; `lohan-jax prepare`) or a plain stream."""
    stream, bin_vocab_size = open_token_file(path, token_dtype=token_dtype, vocab_size=vocab_size)
    fields, sidecar = _read_sidecar(path)
    _warn_if_other_tokenizer(fields, tokenizer, path)
    mask = open_mask_file(path.with_name(fields["mask"]), len(stream)) if fields.get("mask") else None
    if fields.get("seq_len") is None:
        return TokenDataset(stream, seq_len=seq_len, vocab_size=bin_vocab_size, name=str(path), mask=mask, **kw)
    if fields["seq_len"] != seq_len:
        raise ValueError(f"{path} was packed into sequences of {fields['seq_len']} tokens ({sidecar}) but "
                         f"train.seq_len={seq_len}; set train.seq_len={fields['seq_len']} or prepare it again with "
                         f"--seq-len {seq_len}")
    return PackedDataset(stream, seq_len=seq_len, micro_batches=micro_batches, vocab_size=bin_vocab_size,
                         name=str(path), mask=mask, **kw)


def _warn_if_other_tokenizer(fields: dict, tokenizer, path: Path) -> None:
    """Token files record the sha256 of their tokenizer.json; training with another one is likely a mistake."""
    recorded, tok_path = fields.get("tokenizer_sha256"), getattr(tokenizer, "path", None)
    if isinstance(tokenizer, (str, Path)) and str(tokenizer) not in ("", "byte"):  # a spec for load_tokenizer
        tok_path = Path(tokenizer).expanduser()
        tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    if recorded and tok_path is not None and Path(tok_path).is_file():
        if hashlib.sha256(Path(tok_path).read_bytes()).hexdigest() != recorded:
            logger.warning("%s was tokenized with %s, not with %s (their tokenizer.json files differ); token ids "
                           "may mean other words", path, fields.get("tokenizer", "another tokenizer"), tok_path)


def _synthetic_vocab_size(source: str, vocab_size: int | None, tokenizer) -> int:
    suffix = source.partition(":")[2]
    if suffix:
        if not suffix.isdigit():
            raise ValueError(f"source {source!r}: expected 'synthetic:VOCAB_SIZE' with an integer, got {suffix!r}")
        if vocab_size is not None and vocab_size != int(suffix):
            raise ValueError(f"source {source!r} names vocab size {suffix} but vocab_size={vocab_size} was passed")
        return int(suffix)
    if vocab_size is not None:
        return vocab_size
    return _as_tokenizer(tokenizer).vocab_size


def _as_tokenizer(tokenizer: Tokenizer | str | None) -> Tokenizer:
    # Checked by type, not hasattr(.., "encode"): a str has an encode method too.
    return load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, (str, Path)) else tokenizer


def open_dataset(
    source: str,
    *,
    tokenizer: Tokenizer | str | None = None,
    seq_len: int,
    batch_size: int,
    seed: int,
    eval_fraction: float = 0.01,
    token_dtype: str | None = None,
    vocab_size: int | None = None,
    micro_batches: int = 1,
) -> TokenDataset:
    """Opens `source` as a TokenDataset; see SOURCES_ACCEPTED for the forms `source` may take.

    `tokenizer` (an object, or a spec for load_tokenizer) is used only by text sources and, when neither the
    source nor `vocab_size` gives one, for the vocab size of synthetic data. `token_dtype` and `vocab_size`
    describe .bin files and must agree with a sidecar when both are present (a sidecar's vocabulary may be
    smaller than `vocab_size`, the model's). A .bin whose sidecar names a seq_len was packed by
    `lohan-jax prepare` and opens as a PackedDataset, which needs `micro_batches` to number its samples.
    """
    shape = dict(seq_len=seq_len, batch_size=batch_size, seed=seed)
    token_dtype = token_dtype or None  # config files spell "not set" as ""
    if source == "synthetic" or source.startswith("synthetic:"):
        return SyntheticTokenDataset(vocab_size=_synthetic_vocab_size(source, vocab_size, tokenizer), **shape)

    if source.startswith("builtin:"):
        corpus = source.removeprefix("builtin:")
        if corpus not in BUILTIN_CORPORA:
            raise ValueError(f"unknown built-in corpus {corpus!r}; known: {sorted(BUILTIN_CORPORA)}")
        documents = BUILTIN_CORPORA[corpus]()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"data source {source!r} does not exist; expected {SOURCES_ACCEPTED}")
        if path.is_file() and path.suffix == ".bin":
            return _open_bin(path, token_dtype=token_dtype, vocab_size=vocab_size, micro_batches=micro_batches,
                             tokenizer=tokenizer, eval_fraction=eval_fraction, **shape)
        if path.is_file() and path.suffix != ".txt":
            raise ValueError(f"data source {source!r} has an unknown extension; expected {SOURCES_ACCEPTED}")
        documents = (_read_text(p) for p in _text_files_under(path))

    tokenizer = _as_tokenizer(tokenizer)
    if vocab_size is not None and vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's vocab_size {tokenizer.vocab_size} "
                         f"({tokenizer!r}): the tokenizer does not match the model; use the model's tokenizer")
    stream = encode_documents(documents, tokenizer)
    return TokenDataset(
        stream, vocab_size=vocab_size or tokenizer.vocab_size, eval_fraction=eval_fraction, name=source, **shape
    )
