"""lohan-jax: fine-tune LLMs larger than GPU memory on one GPU, with weights and Adam state in host memory
and on NVMe moved on a measured, traffic-aware schedule (a JAX reimplementation of LoHan/Fuyou/Ratel).

The public API for your own training loop:
    model = DecoderModel(embed_module, block_module, head_module, n_layers)   # any Flax units
    engine = OffloadEngine(model, params, uniform_plan(n_layers), optim=OptimConfig(...), total_steps=N,
                           micro_batch_shape=(batch, seq_len))
    metrics = engine.step(step_batch(data, step, n_micro))    # one synchronous offloaded AdamW step
See examples/custom_block.py.
"""
from lohan_jax.batches import step_batch
from lohan_jax.config import Config, ConfigError, OptimConfig, load_config
from lohan_jax.models import DecoderModel, ModelSpec, build_model, get_spec
from lohan_jax.plan import ActivationPolicy, Plan, Tier, UnitPlan, UpdateOn, uniform_plan

__version__ = "0.1.0"


def __getattr__(name):  # the engine pulls in numba and the host kernels: import it on first use
    if name in ("OffloadEngine", "DataParallelEngine"):
        import lohan_jax.engine
        return getattr(lohan_jax.engine, name)
    if name == "ReferenceTrainer":
        from lohan_jax.reference import ReferenceTrainer
        return ReferenceTrainer
    raise AttributeError(f"module 'lohan_jax' has no attribute {name!r}")


__all__ = ["ActivationPolicy", "Config", "ConfigError", "DataParallelEngine", "DecoderModel", "ModelSpec",
           "OffloadEngine", "OptimConfig", "Plan", "ReferenceTrainer", "Tier", "UnitPlan", "UpdateOn", "build_model",
           "get_spec", "load_config", "step_batch", "uniform_plan"]
