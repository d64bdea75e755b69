"""Hugging Face `MambaConfig` / `Mamba2Config` dicts, and original `state-spaces` (mamba_ssm) config.json
files -> `ssm_llm.MambaConfig` / `Mamba2Config`."""

from __future__ import annotations

import math
from typing import Any

from converters.hf_fields import config_dict, eos_token_ids, get_bool, get_dict, get_float, get_int, token_id
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

SSM_MODEL_TYPES = ("mamba", "mamba2")
_ARCHITECTURES = {"MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2"}


def ssm_model_type(d: dict[str, Any]) -> str | None:
    """ "mamba" / "mamba2" for Hugging Face configs, "state-spaces" for mamba_ssm's, else None.

    `architectures` is consulted only when `model_type` is absent: a present model_type decides."""
    if d.get("model_type") in SSM_MODEL_TYPES:
        return d["model_type"]
    if d.get("model_type") is not None:
        return None
    for arch in d.get("architectures") or ():
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    if "d_model" in d and "n_layer" in d and "model_type" not in d:
        return "state-spaces"
    return None


def _float(value, key: str) -> float:
    """A float from JSON, where infinity may be written as a string or `{"__float__": "Infinity"}`."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    if isinstance(value, bool):
        raise ValueError(f"config {key} holds {value!r}, not a number")
    try:
        return float(value)  # float() accepts "inf", "Infinity", "-inf"
    except (TypeError, ValueError):
        raise ValueError(f"config {key} holds {value!r}, not a number") from None


def _time_step_limit(value) -> tuple[float, float]:
    if value is None:
        return (0.0, math.inf)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"time_step_limit must be a pair (lo, hi), got {value!r}")
    return (_float(value[0], "time_step_limit"), _float(value[1], "time_step_limit"))


def _require(d: dict[str, Any], *keys: str) -> list[int]:
    """The positive ints under `keys`; every missing one is named in one error."""
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ValueError(f"config is missing required key(s) {missing}")
    return [get_int(d, k) for k in keys]


def _time_step_rank(d: dict[str, Any], key: str) -> int:
    """ "auto" (or missing) -> 0, which the config resolves to ceil(hidden_size / 16); else an int >= 1."""
    return 0 if d.get(key) in (None, "auto") else get_int(d, key)


def _inner_size(d: dict[str, Any], hidden: int) -> int:
    """int(expand * hidden), truncated as transformers and mamba_ssm do."""
    inner = int(get_float(d, "expand", 2.0) * hidden)
    if inner < 1:
        raise ValueError(f"config expand={d.get('expand')!r} times hidden size {hidden} leaves no channels")
    return inner


def _from_hf(d: dict[str, Any], model_type: str) -> MambaConfig | Mamba2Config:
    vocab, hidden, layers = _require(d, "vocab_size", "hidden_size", "num_hidden_layers")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=_inner_size(d, hidden),
        conv_kernel=get_int(d, "conv_kernel", 4),
        layer_norm_epsilon=get_float(d, "layer_norm_epsilon", 1e-5),
        use_bias=get_bool(d, "use_bias", False),
        use_conv_bias=get_bool(d, "use_conv_bias", True),
        hidden_act="silu" if d.get("hidden_act") is None else d["hidden_act"],
        bos_token_id=token_id(d, "bos_token_id"),
        eos_token_ids=eos_token_ids(d),
    )
    if model_type == "mamba":
        return MambaConfig(
            **common,
            state_size=get_int(d, "state_size", 16),
            tie_word_embeddings=get_bool(d, "tie_word_embeddings", True),
            time_step_rank=_time_step_rank(d, "time_step_rank"),
        )
    return Mamba2Config(
        **common,
        state_size=get_int(d, "state_size", 128),
        num_heads=get_int(d, "num_heads", 128),
        head_dim=get_int(d, "head_dim", 64),
        n_groups=get_int(d, "n_groups", 8),
        chunk_size=get_int(d, "chunk_size", 256),
        time_step_limit=_time_step_limit(d.get("time_step_limit")),
        tie_word_embeddings=get_bool(d, "tie_word_embeddings", False),
    )


def _from_state_spaces(d: dict[str, Any]) -> MambaConfig | Mamba2Config:
    """mamba_ssm's `MambaConfig` JSON (d_model, n_layer, ssm_cfg, ...), with its defaults."""
    hidden, layers, vocab = _require(d, "d_model", "n_layer", "vocab_size")
    if get_int(d, "d_intermediate", 0, minimum=0) or d.get("attn_layer_idx"):
        raise ValueError("state-spaces configs with MLP (d_intermediate > 0) or attention layers are not supported")
    if not get_bool(d, "rms_norm", True):
        raise ValueError("state-spaces configs with LayerNorm (rms_norm=false) are not supported")
    multiple = get_int(d, "pad_vocab_size_multiple", 8)
    vocab = -(-vocab // multiple) * multiple  # mamba_ssm pads the embedding rows
    ssm = get_dict(d, "ssm_cfg")
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"unknown state-spaces ssm_cfg layer {layer!r}; supported: Mamba1, Mamba2")
    inner = _inner_size(ssm, hidden)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=inner,
        conv_kernel=get_int(ssm, "d_conv", 4),
        layer_norm_epsilon=get_float(d, "norm_epsilon", 1e-5),
        use_bias=get_bool(ssm, "bias", False),
        use_conv_bias=get_bool(ssm, "conv_bias", True),
        tie_word_embeddings=get_bool(d, "tie_embeddings", True),
    )
    if layer == "Mamba1":
        return MambaConfig(
            **common, state_size=get_int(ssm, "d_state", 16), time_step_rank=_time_step_rank(ssm, "dt_rank")
        )
    if (
        ssm.get("d_ssm") not in (None, inner)
        or ssm.get("D_has_hdim")
        or not get_bool(ssm, "rmsnorm", True)
        or get_bool(ssm, "norm_before_gate", False)
    ):
        raise ValueError(
            f"unsupported Mamba2 ssm_cfg options (d_ssm, D_has_hdim, rmsnorm=False or norm_before_gate=True): {ssm}"
        )
    head_dim = get_int(ssm, "headdim", 64)
    if inner % head_dim:
        raise ValueError(f"Mamba2 inner size {inner} is not a multiple of headdim {head_dim}")
    return Mamba2Config(
        **common,
        state_size=get_int(ssm, "d_state", 128),
        num_heads=inner // head_dim,
        head_dim=head_dim,
        n_groups=get_int(ssm, "ngroups", 1),
        chunk_size=get_int(ssm, "chunk_size", 256),
        time_step_limit=_time_step_limit(ssm.get("dt_limit")),
    )


def ssm_config_from_hf(d: dict[str, Any]) -> MambaConfig | Mamba2Config:
    """Map a Mamba / Mamba-2 config dict (Hugging Face or state-spaces layout) to our config."""
    d = config_dict(d)
    kind = ssm_model_type(d)
    if kind is None:
        raise ValueError(f"not a Mamba config: model_type={d.get('model_type')!r}")
    return _from_state_spaces(d) if kind == "state-spaces" else _from_hf(d, kind)
