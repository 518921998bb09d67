"""Memory tiers: pinned host buffers and device placement (the only module applying memory kinds)."""
from lohan_jax.tiers.memory import HostBuffer, MemorySpaces, MeshSpaces, ShardedHostBuffer

__all__ = ["HostBuffer", "MemorySpaces", "MeshSpaces", "ShardedHostBuffer"]
