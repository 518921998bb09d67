"""Hugging Face interop: ModelSpec from config.json, and weights to and from HF tensor names and layouts."""
from lohan_jax.hf.config import spec_from_hf_config
from lohan_jax.hf.convert import params_from_hf, params_to_hf
from lohan_jax.hf.layout import LAYOUTS, HFLayout, Layout, TensorMap, layout_of, tensor_table

__all__ = ["HFLayout", "LAYOUTS", "Layout", "TensorMap", "layout_of", "params_from_hf", "params_to_hf",
           "spec_from_hf_config", "tensor_table"]
