"""Checkpoints -> `(config, params)`: attention models (`ssm_llm.ModelConfig`) and Mamba / Mamba-2.

config, params = converters.load("model.gguf")          # GGUF (dequantized)
config, params = converters.load("hf_model_dir/")        # safetensors or pytorch_model.bin
config, params = converters.load(hf_model)               # in-memory transformers model
config, params = converters.load(state_dict, config=hf_config)
converters.save(params, config, "ckpt/"); converters.load("ckpt/")   # orbax, no torch needed
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp

from converters.attention_weights import convert_attention_weights
from converters.checkpoint import is_checkpoint, load_checkpoint, save
from converters.gguf_file import read_gguf
from converters.hf_config import config_from_hf
from converters.hf_source import read_hf_directory, read_state_dict, read_transformers_model
from converters.mamba_weights import convert_mamba_weights
from converters.tokenizer import load_tokenizer
from ssm_llm.config import ModelConfig
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

__all__ = ["config_from_hf", "load", "load_tokenizer", "save"]

_GGUF_MAGIC = b"GGUF"


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _read(source, config):
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.is_dir():
            return read_hf_directory(path)
        if _is_gguf(path):
            return read_gguf(path)
        raise ValueError(f"{path}: not a GGUF file (bad magic) nor a model directory")
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return read_transformers_model(source)
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("loading a state dict needs its config: converters.load(state_dict, config=...)")
        return read_state_dict(source, config)
    raise TypeError(f"cannot load a checkpoint from {type(source).__name__}")


def load(
    source, config=None, *, dtype=jnp.float32, progress: bool = False
) -> tuple[ModelConfig | MambaConfig | Mamba2Config, dict]:
    """Load a checkpoint as `(config, params)` with params in `dtype`.

    `source`: a GGUF file, a Hugging Face model directory, a directory written by `save`, an in-memory
    `transformers` model, or a state dict (then `config`: a transformers config or dict is required).
    Architectures: llama, qwen2, mistral (also from GGUF), mamba and mamba2 (Hugging Face or the
    original state-spaces layout).
    Strict: an unknown architecture, a missing, unused or mis-shaped tensor raises ValueError naming it.
    """
    if isinstance(source, (str, Path)) and is_checkpoint(source):
        return load_checkpoint(source, dtype)
    hf_config, tensors = _read(source, config)
    model_config = config_from_hf(hf_config)
    convert = convert_attention_weights if isinstance(model_config, ModelConfig) else convert_mamba_weights
    return model_config, convert(model_config, tensors, dtype, progress)
