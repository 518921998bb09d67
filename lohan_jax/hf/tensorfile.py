"""The safetensors file format, read and written directly: one tensor at a time, bf16 included.

We parse the format ourselves (8-byte little-endian header length, a JSON header, then the raw bytes) instead of
going through `safetensors.safe_open`: its numpy backend cannot return bf16 in several versions, and writing
through `save_file` needs every tensor of a shard in memory at once. Here a reader returns one tensor as a fresh
numpy array of its stored dtype (bf16 as `ml_dtypes.bfloat16`), and a writer declares its tensors up front (so
the header is known) and then streams them in order, so export never holds more than one unit of the model.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The safetensors crate refuses headers above 100 MB; a bigger length field means a corrupt or foreign file.
MAX_HEADER_BYTES = 100_000_000


def dtype_code(dtype: Any) -> str:
    """The safetensors code ("BF16", "F32", ...) of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} has no safetensors code; supported: {', '.join(map(str, _NAMES))}")
    return _NAMES[dtype]


class TensorInfo(NamedTuple):
    """One tensor of a file as its header describes it; `offset` is absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors by name, `__metadata__`) of a safetensors file, validated against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path} is not a safetensors file, or is truncated: its header length field says "
                             f"{n} bytes and the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_start = 8 + n
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if code not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code!r}, which we cannot read; "
                             f"supported: {', '.join(DTYPES)}")
        expected = math.prod(shape) * DTYPES[code].itemsize
        if end - begin != expected or begin < 0:
            raise ValueError(f"{path}: tensor {name!r} ({code}{list(shape)}) spans bytes [{begin}, {end}) but needs "
                             f"{expected}")
        if data_start + end > size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file "
                             f"has {size}; download or copy it again")
        tensors[name] = TensorInfo(name, code, shape, data_start + begin, expected)
    return tensors, metadata


class SafetensorsReader:
    """Reads tensors of one safetensors file one at a time; each read is one `readinto` of its bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())

    def read(self, name: str) -> np.ndarray:
        """A fresh, writable array of the tensor's stored dtype and shape."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path} holds no tensor {name!r}")
        buf = np.empty(info.nbytes, np.uint8)
        self._file.seek(info.offset)
        if self._file.readinto(buf) != info.nbytes:
            raise ValueError(f"{self.path}: short read of tensor {name!r}; is the file being written?")
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are declared up front and then written in that order.

    `entries` are (name, safetensors dtype code, shape). The header goes out first (padded to 8 bytes, as the
    reference implementation does), then each `write(name, array)` appends that tensor's bytes; `close` checks
    that every declared tensor arrived.
    """

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._pending: list[tuple[str, str, tuple[int, ...]]] = []
        for name, code, shape in entries:
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._pending.append((name, code, tuple(shape)))
        self._pending.reverse()
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self.nbytes = offset

    def write(self, name: str, array: np.ndarray) -> None:
        if not self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} was not declared")
        want_name, code, shape = self._pending.pop()
        if name != want_name or dtype_code(array.dtype) != code or tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: got {name!r} {array.dtype}{list(array.shape)}, expected the next "
                             f"declared tensor {want_name!r} {code}{list(shape)}")
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} declared tensors were never written "
                             f"(next: {self._pending[-1][0]!r})")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()
