"""Hugging Face `config.json` (transformers 4 or 5 layout) -> `ssm_llm.ModelConfig`."""

from __future__ import annotations

from typing import Any

from converters.hf_fields import eos_token_ids
from converters.hf_ssm_config import SSM_MODEL_TYPES, ssm_config_from_hf, ssm_model_type
from ssm_llm.config import ModelConfig, RopeConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
_DEFAULT_THETA = 10000.0


def _model_type(d: dict[str, Any]) -> str:
    model_type = d.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    for arch in d.get("architectures") or ():
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise ValueError(
        f"unknown architecture: model_type={model_type!r}, architectures={d.get('architectures')}; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES + SSM_MODEL_TYPES)}"
    )


def _rope(d: dict[str, Any]) -> RopeConfig:
    """Read rope settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = dict(d.get("rope_parameters") or {})
    params.update({k: v for k, v in (d.get("rope_scaling") or {}).items() if k not in params})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported by the attention family")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", d.get("rope_theta")) or _DEFAULT_THETA
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only full rotary embeddings)")
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ValueError(f"rope_type {rope_type!r} needs a 'factor' in rope_parameters")
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"rope_type 'llama3' needs {key!r} in rope_parameters")
            kwargs[key] = float(params[key])
        kwargs["original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings") or d.get("max_position_embeddings", 8192)
        )
    return RopeConfig(**kwargs)


def _layer_windows(d: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if not window:
        return (0,) * num_layers
    layer_types = d.get("layer_types")
    if model_type == "qwen2" and not layer_types:
        first = d.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not layer_types:
        return (int(window),) * num_layers
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


def config_from_hf(d: dict[str, Any]):
    """Map a Hugging Face config dict (e.g. `json.load(config.json)` or `config.to_dict()`) to a
    `ModelConfig`, or to a `MambaConfig` / `Mamba2Config` for Mamba models (state-spaces layout too)."""
    if ssm_model_type(d) is not None:
        return ssm_config_from_hf(d)
    model_type = _model_type(d)
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (the attention family uses SwiGLU / silu)")
    try:
        hidden, heads, layers = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
        vocab, inter = d["vocab_size"], d["intermediate_size"]
    except KeyError as e:
        raise ValueError(f"config is missing required key {e.args[0]!r}") from None
    attention_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=_rope(d),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (model_type == "llama" and attention_bias),
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
        layer_windows=_layer_windows(d, model_type, layers),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_token_ids(d.get("eos_token_id")),
        model_type=model_type,
    )
