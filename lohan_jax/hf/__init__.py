"""Hugging Face interop: ModelSpec from config.json, weights to and from HF tensor names and layouts, and
checkpoint directories (single or sharded safetensors) read and written one unit at a time."""
from lohan_jax.hf.checkpoint import HFCheckpoint, read_hf_config, spec_from_checkpoint
from lohan_jax.hf.config import hf_config_from_spec, spec_from_hf_config
from lohan_jax.hf.convert import params_from_hf, params_to_hf
from lohan_jax.hf.export import EXPORT_DTYPES, export_checkpoint
from lohan_jax.hf.layout import LAYOUTS, HFLayout, Layout, TensorMap, layout_of, tensor_table
from lohan_jax.hf.tensorfile import SafetensorsReader, SafetensorsWriter, read_header

__all__ = ["EXPORT_DTYPES", "HFCheckpoint", "HFLayout", "LAYOUTS", "Layout", "SafetensorsReader",
           "SafetensorsWriter", "TensorMap", "export_checkpoint", "hf_config_from_spec", "layout_of",
           "params_from_hf", "params_to_hf", "read_header", "read_hf_config", "spec_from_checkpoint",
           "spec_from_hf_config", "tensor_table"]
