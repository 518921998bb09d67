"""Tokenizers that turn text into token ids: a byte-level one built in, Hugging Face `tokenizers` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

# Names that pretrained tokenizers use for "end of document", in the order we try them: SentencePiece/Llama-2
# ("</s>"), GPT-2/NeoX ("<|endoftext|>"), Gemma ("<eos>"), Llama-3 ("<|end_of_text|>").
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer; both tokenizers here satisfy it."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus one end-of-document id (256).

    Needs no file and no network, so the default corpus trains end to end anywhere; vocab_size is 257.
    """

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        """Returns int32[n] byte values of `text` in UTF-8; no eos is appended."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Drops the eos id (and any id above 255) and decodes the rest; broken UTF-8 becomes U+FFFD,

        because a window cut from the stream can start or end inside a multi-byte character.
        """
        ids_n = np.asarray(ids).reshape(-1)
        byte_ids = ids_n[(ids_n >= 0) & (ids_n < 256)].astype(np.uint8)
        return byte_ids.tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a tokenizer.json file.

    The eos id comes, in order, from `eos_token`, from "eos_token" in a tokenizer_config.json next to the file,
    or from the first of EOS_CANDIDATES in the vocabulary; with none of these the constructor raises.
    """

    def __init__(self, path: str | Path, *, eos_token: str | None = None):
        try:
            import tokenizers  # imported here so that byte-level runs do not need the package
        except ImportError as e:
            raise ImportError(
                "HFTokenizer needs the `tokenizers` package (pip install tokenizers); "
                "or use the byte tokenizer (tokenizer: byte)"
            ) from e
        self.path = Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_token = eos_token or _eos_from_config(self.path.parent) or self._find_eos_candidate()
        eos_id = self._tok.token_to_id(self.eos_token)
        if eos_id is None:
            raise ValueError(f"eos token {self.eos_token!r} is not in the vocabulary of {self.path}")
        self.eos_id = int(eos_id)

    def _find_eos_candidate(self) -> str:
        for name in EOS_CANDIDATES:
            if self._tok.token_to_id(name) is not None:
                return name
        raise ValueError(
            f"tokenizer {self.path} has none of the end-of-document tokens {list(EOS_CANDIDATES)} and no "
            "tokenizer_config.json naming one; pass the eos token explicitly (eos_token=...)"
        )

    def encode(self, text: str) -> np.ndarray:
        """Returns int32[n] ids without special tokens (documents are joined with eos by the caller)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """Decodes ids, special tokens included, so that document boundaries stay visible."""
        return self._tok.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, eos_token={self.eos_token!r})"


def _eos_from_config(directory: Path) -> str | None:
    """Reads "eos_token" from a transformers tokenizer_config.json, where it is a string or {"content": ...}."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    eos = json.loads(config_path.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def load_tokenizer(spec: str | Path | None, *, eos_token: str | None = None) -> Tokenizer:
    """Builds a tokenizer from a config string.

    None, "" or "byte" gives ByteTokenizer; a path to a tokenizer.json, or to a directory that holds one, gives
    HFTokenizer (with `eos_token` overriding the one it would find).
    """
    if spec is None or spec in ("", "byte"):
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer directory {path} has no tokenizer.json in it")
        return HFTokenizer(path / "tokenizer.json", eos_token=eos_token)
    if path.is_file() and path.suffix == ".json":
        return HFTokenizer(path, eos_token=eos_token)
    problem = "does not exist" if not path.exists() else "is not a .json file"
    raise ValueError(
        f"tokenizer {str(spec)!r} {problem}; expected None or 'byte' (byte-level tokenizer), a path to a "
        "Hugging Face tokenizer.json, or a directory containing tokenizer.json"
    )
