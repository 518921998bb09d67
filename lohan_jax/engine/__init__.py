"""The offloaded engine: executes a plan (placement, updates, activation policy) one optimizer step at a time,
on one GPU (OffloadEngine) or data parallel on several GPUs of one host (DataParallelEngine)."""
from lohan_jax.engine.data_parallel import DataParallelEngine
from lohan_jax.engine.engine import OffloadEngine

__all__ = ["DataParallelEngine", "OffloadEngine"]
