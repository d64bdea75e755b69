"""Hugging Face `config.json` (transformers 4 or 5 layout) -> `ssm_llm.ModelConfig`."""

from __future__ import annotations

from typing import Any

from converters.hf_fields import config_dict, eos_token_ids, get_bool, get_dict, get_float, get_int, token_id
from converters.hf_ssm_config import SSM_MODEL_TYPES, ssm_config_from_hf, ssm_model_type
from ssm_llm.config import MAX_LAYERS, ModelConfig, RopeConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
_DEFAULT_THETA = 10000.0
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _model_type(d: dict[str, Any]) -> str:
    """`model_type`; `architectures` is a fallback only when model_type is absent (old configs), never an
    override: weights of a foreign model_type must not load as a Llama."""
    model_type = d.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    if model_type is None:
        for arch in d.get("architectures") or ():
            if arch in _ARCHITECTURES:
                return _ARCHITECTURES[arch]
    raise ValueError(
        f"unknown architecture: model_type={model_type!r}, architectures={d.get('architectures')}; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES + SSM_MODEL_TYPES)}"
    )


def _rope(d: dict[str, Any]) -> RopeConfig:
    """Read rope settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = get_dict(d, "rope_parameters")
    params.update({k: v for k, v in get_dict(d, "rope_scaling").items() if k not in params})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported by the attention family")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = get_float(params, "rope_theta", get_float(d, "rope_theta", _DEFAULT_THETA))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only full rotary embeddings)")
    kwargs: dict[str, Any] = {"theta": theta, "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if params.get("factor") is None:
            raise ValueError(f"rope_type {rope_type!r} needs a 'factor' in rope_parameters")
        kwargs["factor"] = get_float(params, "factor")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ValueError(f"rope_type 'llama3' needs {key!r} in rope_parameters")
            kwargs[key] = get_float(params, key)
        kwargs["original_max_position_embeddings"] = get_int(
            params, "original_max_position_embeddings", get_int(d, "max_position_embeddings", 8192)
        )
    return RopeConfig(**kwargs)


def _layer_windows(d: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    window = get_int(d, "sliding_window", 0, minimum=0)  # 0 / null: no sliding window
    if model_type == "qwen2" and not get_bool(d, "use_sliding_window", False):
        window = 0
    if not window:
        return (0,) * num_layers
    layer_types = d.get("layer_types")
    if model_type == "qwen2" and not layer_types:
        first = get_int(d, "max_window_layers", num_layers, minimum=0)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not layer_types:
        return (window,) * num_layers
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ValueError(f"config.layer_types must list {num_layers} layer types, got {layer_types!r}")
    unknown = sorted({repr(t) for t in layer_types if t not in _LAYER_TYPES})
    if unknown:
        raise ValueError(
            f"config.layer_types holds unsupported type(s) {', '.join(unknown)}; supported: {', '.join(_LAYER_TYPES)}"
        )
    return tuple(window if t == "sliding_attention" else 0 for t in layer_types)


def _required_int(d: dict[str, Any], key: str) -> int:
    if d.get(key) is None:
        raise ValueError(f"config is missing required key {key!r}")
    return get_int(d, key)


def config_from_hf(d: dict[str, Any]):
    """Map a Hugging Face config dict (e.g. `json.load(config.json)` or `config.to_dict()`) to a
    `ModelConfig`, or to a `MambaConfig` / `Mamba2Config` for Mamba models (state-spaces layout too)."""
    d = config_dict(d)
    if ssm_model_type(d) is not None:
        return ssm_config_from_hf(d)
    model_type = _model_type(d)
    act = "silu" if d.get("hidden_act") is None else d["hidden_act"]  # null: the default, as for every field
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (the attention family uses SwiGLU / silu)")
    hidden, heads, layers, vocab, inter = (
        _required_int(d, k)
        for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    )
    if layers > MAX_LAYERS:  # before _layer_windows builds one entry per layer
        raise ValueError(f"config.num_hidden_layers must be at most {MAX_LAYERS}, got {layers}")
    attention_bias = get_bool(d, "attention_bias", False)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=get_int(d, "num_key_value_heads", heads),
        head_dim=get_int(d, "head_dim", hidden // heads),
        rms_norm_eps=get_float(d, "rms_norm_eps", 1e-6),
        rope=_rope(d),
        max_position_embeddings=get_int(d, "max_position_embeddings", 2048),
        tie_word_embeddings=get_bool(d, "tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2" or (model_type == "llama" and attention_bias),
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and get_bool(d, "mlp_bias", False),
        layer_windows=_layer_windows(d, model_type, layers),
        bos_token_id=token_id(d, "bos_token_id"),
        eos_token_ids=eos_token_ids(d),
        model_type=model_type,
    )
