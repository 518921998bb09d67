"""The offloaded engine: executes a plan (placement, updates, activation policy) one optimizer step at a time."""
from lohan_jax.engine.engine import OffloadEngine

__all__ = ["OffloadEngine"]
