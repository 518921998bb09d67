"""Memory tiers: pinned host buffers and device placement (the only module applying memory kinds)."""
from lohan_jax.tiers.memory import HostBuffer, MemorySpaces

__all__ = ["HostBuffer", "MemorySpaces"]
