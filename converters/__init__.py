"""Checkpoints -> `(config, params)`: attention models (`ssm_llm.ModelConfig`) and Mamba / Mamba-2.

config, params = converters.load("model.gguf")          # GGUF (dequantized)
config, params = converters.load("model.gguf", quantize="w4a16")   # GGUF blocks kept as integer codes
config, params = converters.load("model.gguf", quantize="auto")    # int8 where it is faster on this host
config, params = converters.load("hf_model_dir/")        # safetensors or pytorch_model.bin
config, params = converters.load(hf_model)               # in-memory transformers model
config, params = converters.load(state_dict, config=hf_config)
converters.save(params, config, "ckpt/"); converters.load("ckpt/")   # orbax, no torch needed
config, params = converters.load("model.gguf", cache=True)   # converted once, then read from the cache
config, params = converters.load("hf_model_dir/", mesh=mesh)  # each device gets only its shards
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from converters.attention_weights import convert_attention_weights, convert_quantized_attention_weights
from converters.cache_dir import cache_root
from converters.checkpoint import is_checkpoint, load_checkpoint, save
from converters.gguf_file import read_gguf
from converters.hf_config import config_from_hf
from converters.hf_source import read_hf_directory, read_state_dict, read_transformers_model
from converters.mamba_weights import convert_mamba_weights
from converters.model_cache import load_cached
from converters.packed_hf import PackedTensors, packed_format
from converters.tokenizer import load_text_tokenizer, load_tokenizer, tokenizer_built_aside
from ssm_llm.config import ModelConfig
from ssm_llm.int8_blocks import for_cpu_kernel
from ssm_llm.int8_choice import int8_choice
from ssm_llm.quant import quantize_weights
from ssm_llm.quant.presets import AUTO_PRESET, preset, preset_of
from ssm_llm.sharding import shard_params
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

# Where quantize="auto" records this host's int8 measurement (`ssm_llm.int8_choice`), under the cache root.
INT8_RECORD = "int8_choice.json"
# Set to 0 or 1, this environment variable decides quantize="auto" without measuring (1: int8 on any backend).
INT8_ENV = "SSM_LLM_INT8"

__all__ = [
    "config_from_hf",
    "load",
    "load_text_tokenizer",
    "load_tokenizer",
    "save",
    "tokenizer_built_aside",
]

_GGUF_MAGIC = b"GGUF"


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _read(source, config):
    hf_config, tensors = _read_source(source, config)
    fmt = packed_format(hf_config) if isinstance(hf_config, Mapping) else None
    return hf_config, (tensors if fmt is None else PackedTensors(tensors, fmt))


def _read_source(source, config):
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
    source,
    config=None,
    *,
    dtype=jnp.float32,
    progress: bool = False,
    quantize: str | None = None,
    group_size="auto",
    cache: bool = False,
    cache_in_background: bool = False,
    mesh=None,
) -> tuple[ModelConfig | MambaConfig | Mamba2Config, dict]:
    """Load a checkpoint as `(config, params)` with params in `dtype`.

    `source`: a GGUF file, a Hugging Face model directory, a directory written by `save`, an in-memory
    `transformers` model, or a state dict (then `config`: a transformers config or dict is required).
    Architectures: llama, qwen2, mistral (also from GGUF), mamba and mamba2 (Hugging Face or the
    original state-spaces layout).
    `quantize`: None, or a preset of `ssm_llm.quant.presets` for attention models: a scheme of
    `ssm_llm.quantize_weights` ("w8a8", "w8a16", "w4a16") or "w8a8-rot" / "w8a8-rot-emb" (W8A8 with rotated
    inputs, and an int8 embedding with its 4-bit head residual); the returned config says it. "auto":
    "w8a8-rot-emb" where int8 products are faster than float32 on this host (`ssm_llm.int8_choice`, measured once
    and recorded in the cache directory; $SSM_LLM_INT8=0 / 1 decides instead), None elsewhere and for Mamba
    models; an already quantized checkpoint is kept as it is. From a GGUF file or a GPTQ / AWQ checkpoint the
    linears are built one tensor at a time (presets without options), and with `group_size="native"` a tensor stored as
    Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K or packed by GPTQ / AWQ keeps its codes exactly (4-bit schemes take the
    4-bit formats); other tensors are rounded to nearest. Without `quantize`, GPTQ / AWQ checkpoints load dequantized.
    group_size: "auto" ("native" for the weight-only schemes; per output channel for "w8a8", whose CPU
    integer product wants it), "native", None (per output channel) or an int.
    `cache`: for a GGUF file or a model directory, keep the converted params as an entry under
    `$SSM_LLM_CACHE/models` and read them from there next time (see `converters.model_cache`: keyed by the
    source's content and these options; a damaged entry is rebuilt). `cache_in_background`: on a miss,
    return the converted params at once and store them in a thread the process waits for at exit.
    `mesh`: a `jax.sharding.Mesh`; the params are placed on it by `ssm_llm.sharding`'s rules. A float
    conversion builds each tensor in host memory and sends each device only its shard (no device holds
    the whole model); a cache entry (mapped from its file) is sharded the same way; an orbax checkpoint is
    restored straight into its shards; a quantized conversion is loaded, then sharded. Without a mesh, W8A8
    params come in the CPU int8 kernel's blocked layout where it runs (`ssm_llm.int8_blocks`; checkpoints and
    the cache keep the plain one, and `unblock_int8_weights` turns them back).
    Strict: an unknown architecture, a missing, unused or mis-shaped tensor raises ValueError naming it.
    """
    auto = quantize == "auto"
    if quantize is not None and not auto:
        preset(quantize)  # a clear error for an unknown name
    if group_size not in ("auto", "native", None) and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    ):
        raise ValueError(f"group_size must be 'auto', 'native', None or a positive int, got {group_size!r}")
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise FileNotFoundError(f"no checkpoint at {source}")
    if auto:  # after the checks above: the first call on a host times int8 against float32
        quantize = AUTO_PRESET if int8_decision()[0] else None
    if group_size == "native" and quantize is not None and preset(quantize)[1]:
        raise ValueError(
            f"group_size='native' keeps a file's own codes, which {quantize!r} (rotated or with an int8 "
            "embedding) cannot: its weights are rounded from the float model"
        )
    if group_size == "auto":
        group_size = None if quantize is not None and quantize.startswith("w8a8") else "native"
    if isinstance(source, (str, Path)) and is_checkpoint(source):
        model_config, params = load_checkpoint(source, dtype, mesh=mesh)
        loaded = _quantized(model_config, params, quantize, group_size, auto)
        if mesh is not None and loaded[1] is params:  # restored straight into its shards
            return loaded
    elif cache and isinstance(source, (str, Path)):
        path = Path(source)  # (its existence is checked above)
        options = {"dtype": jnp.dtype(dtype).name, "quantize": quantize, "group_size": group_size}
        convert = functools.partial(_convert, path, None, dtype, progress, quantize, group_size, auto=auto)
        # an entry written under "auto" for a Mamba model holds the float model: refused again if asked for a preset
        loaded = _quantized(
            *load_cached(path, options, convert, background=cache_in_background), quantize, group_size, auto
        )
    else:
        loaded = _convert(source, config, dtype, progress, quantize, group_size, on_host=mesh is not None, auto=auto)
    if mesh is None:
        model_config, params = loaded
        return model_config, for_cpu_kernel(params, model_config)
    model_config, params = loaded
    return model_config, shard_params(params, model_config, mesh)


def int8_decision() -> tuple[bool, str]:
    """quantize="auto"'s choice, and why: $SSM_LLM_INT8 when it is set; else float32 on GPU / TPU (whose fast
    quantized path is another one) and in a multi-process run (each process would time its own host, and all
    must load the same model); else this host's measurement, taken once and recorded at
    `$SSM_LLM_CACHE/int8_choice.json` (`ssm_llm.int8_choice`)."""
    forced = os.environ.get(INT8_ENV, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"${INT8_ENV} must be 0 or 1 (or unset: measure), got {forced!r}")
    if forced:
        return forced == "1", f"${INT8_ENV}={forced}"
    if jax.default_backend() != "cpu":
        return False, f"a {jax.default_backend()} backend"
    if jax.process_count() > 1:
        return False, f"a multi-process run decides int8 only through ${INT8_ENV}"
    choice = int8_choice(cache_root() / INT8_RECORD)
    return choice.pays, f"int8 products {choice.speedup:.2f}x float32's on this CPU"


def _convert(source, config, dtype, progress, quantize, group_size, on_host=False, auto=False):
    """`load` of a source that is not an ssm_llm checkpoint, without the cache; `on_host`: float params as
    numpy arrays in host memory (to be sharded onto a mesh)."""
    hf_config, tensors = _read(source, config)
    model_config = config_from_hf(hf_config)
    scheme, options = preset(quantize) if quantize is not None else (None, {})
    if scheme is not None and not options and isinstance(model_config, ModelConfig) and hasattr(tensors, "native_bits"):
        params = convert_quantized_attention_weights(model_config, tensors, scheme, group_size, dtype, progress)
        return dataclasses.replace(model_config, quantization=scheme), params
    convert = convert_attention_weights if isinstance(model_config, ModelConfig) else convert_mamba_weights
    floats = quantize is None or not isinstance(model_config, ModelConfig)  # auto keeps Mamba models float
    params = convert(model_config, tensors, dtype, progress, on_host=on_host and floats)
    return _quantized(model_config, params, quantize, group_size, auto)


def _quantized(config, params, name, group_size, auto=False):
    """Float params quantized with `quantize_weights` (a float checkpoint asked for the preset `name`); under
    "auto" (`auto`) Mamba models and quantized checkpoints are kept as they are."""
    if name is None or (isinstance(config, ModelConfig) and name in (preset_of(config), config.quantization)):
        return config, params  # (a plain scheme name accepts its rotated variants too, as it always has)
    if not isinstance(config, ModelConfig):
        if auto:
            return config, params
        raise ValueError(
            f"quantize= applies to attention models; this is a {type(config).__name__} "
            "(quantize Mamba models with ssm_llm.quant.quantize_model)"
        )
    if config.quantization != "none":
        if auto:
            return config, params
        raise ValueError(
            f"this checkpoint is already quantized ({preset_of(config) or config.quantization!r}); quantize={name!r} "
            "needs the float model"
        )
    scheme, options = preset(name)
    group_size = None if group_size == "native" else group_size
    params, config = quantize_weights(params, config, scheme, group_size, progress=False, **options)
    return config, params
