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
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding


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

    def write(self, values: np.ndarray) -> None:
        """Overwrite the buffer (same contract as writing through `view`)."""
        self.view[...] = values


class MeshSpaces:
    """HBM and pinned host memory of every device of a one-axis mesh (data parallel).

    Arrays keep their sharding across memory kinds: a transfer moves each device's shard between that device's
    HBM and its own pinned host buffer. Host numpy arrays are split along their first axis (a batch, or a flat
    vector padded to a multiple of the device count).
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.device = mesh.devices.flat[0]  # budgets are per device; every device is alike
        axis = PartitionSpec(mesh.axis_names[0])
        self.hbm = NamedSharding(mesh, axis, memory_kind="device")
        self.host = NamedSharding(mesh, axis, memory_kind="pinned_host")
        self.replicated = NamedSharding(mesh, PartitionSpec(), memory_kind="device")

    def to_hbm(self, x: Any) -> Any:
        return jax.device_put(x, x.sharding.with_memory_kind("device") if isinstance(x, jax.Array) else self.hbm)

    def to_host(self, x: Any) -> Any:
        return jax.device_put(x, x.sharding.with_memory_kind("pinned_host") if isinstance(x, jax.Array)
                              else self.host)

    def replicate(self, x: Any) -> Any:
        """The same value in every device's HBM (small constants)."""
        return jax.device_put(x, self.replicated)


class ShardedHostBuffer:
    """A flat vector split over the mesh's devices, each shard in that device's pinned host memory, plus a
    writable numpy view of every shard (in device order). Same contract as HostBuffer."""

    def __init__(self, spaces: MeshSpaces, values: np.ndarray):
        self.array = spaces.to_host(np.ascontiguousarray(values))
        self.array.block_until_ready()
        shards = sorted(self.array.addressable_shards, key=lambda s: s.index[0].start or 0)
        self.bounds = [(s.index[0].start or 0, s.index[0].stop or values.shape[0]) for s in shards]
        self.views = [_writable_view(s.data) for s in shards]
        self.dtype = self.array.dtype

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def write(self, values: np.ndarray) -> None:
        for (lo, hi), view in zip(self.bounds, self.views):
            view[...] = values[lo:hi]
