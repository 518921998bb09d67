"""Memory kinds in one place: pinned-host and device shardings, transfers, and writable pinned buffers.

Everything that crosses PCIe lives in `pinned_host` memory (MACHINE.md: 52 GB/s pinned against 6.9 GB/s from
pageable numpy). The CPU optimizer writes the next bf16 weights straight into the pinned buffer that the
next forward uploads, through a writable numpy view of XLA's own pinned allocation.
"""
from __future__ import annotations

import ctypes
from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding


class MemorySpaces:
    """Shardings for the device's HBM and its pinned host memory."""

    def __init__(self, device: jax.Device | None = None):
        self.device = device or jax.devices()[0]
        self.hbm = SingleDeviceSharding(self.device, memory_kind="device")
        self.host = SingleDeviceSharding(self.device, memory_kind="pinned_host")

    def to_hbm(self, x: Any) -> Any:
        """Asynchronous upload (host -> GPU); a no-op for arrays already in HBM."""
        return jax.device_put(x, self.hbm)

    def to_host(self, x: Any) -> Any:
        """Asynchronous download into pinned host memory."""
        return jax.device_put(x, self.host)


def _writable_view(array: jax.Array) -> np.ndarray:
    """A writable numpy view of a host-resident jax array's buffer (no copy)."""
    ptr = array.unsafe_buffer_pointer()
    ctype = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}[array.dtype.itemsize]
    raw = np.ctypeslib.as_array((ctype * array.size).from_address(ptr))
    return raw.view(array.dtype).reshape(array.shape)


class HostBuffer:
    """A flat pinned-host jax array plus a writable numpy view of the same bytes.

    Contract: the owner writes through `view` only while no transfer reads `array` (the engine writes a
    block's weights after that block's backward has consumed them and before its next upload is issued).
    """

    def __init__(self, spaces: MemorySpaces, values: np.ndarray):
        self.array = spaces.to_host(np.ascontiguousarray(values))
        self.array.block_until_ready()
        self.view = _writable_view(self.array)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes
