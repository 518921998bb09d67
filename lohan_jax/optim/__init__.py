"""Optimizers: the optax AdamW reference semantics (schedule) and the fused host AdamW kernel (host_adamw)."""
