"""Data pipeline: tokenizers, token sources and deterministic batches for training and evaluation."""

from lohan_jax.data.dataset import Batch, SyntheticTokenDataset, TokenDataset
from lohan_jax.data.packed import PackedDataset
from lohan_jax.data.sources import BUILTIN_CORPORA, SOURCES_ACCEPTED, encode_documents, open_dataset, pydoc_documents
from lohan_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_CORPORA",
    "SOURCES_ACCEPTED",
    "Batch",
    "ByteTokenizer",
    "HFTokenizer",
    "PackedDataset",
    "SyntheticTokenDataset",
    "TokenDataset",
    "Tokenizer",
    "encode_documents",
    "load_tokenizer",
    "open_dataset",
    "pydoc_documents",
]
