"""lohan-jax: fine-tune LLMs larger than GPU memory on one GPU, with weights and Adam state in host memory
and on NVMe moved on a measured, traffic-aware schedule (a JAX reimplementation of LoHan/Fuyou/Ratel)."""
from lohan_jax.config import Config, ConfigError, load_config
from lohan_jax.models import DecoderModel, ModelSpec, build_model, get_spec

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "DecoderModel", "ModelSpec", "build_model", "get_spec", "load_config"]
