"""Saved configs: `config_from_dict` rebuilds any model config from the dict its `to_dict` wrote.

The one module that knows every config type (attention `ModelConfig`, `MambaConfig`, `Mamba2Config` and
the quantized `QuantizedSSMConfig`), so the config modules never import each other to deserialise. It
imports `ssm_llm.quant`, so it sits above the kv | speculative | quant layer (see the import-linter
contract in pyproject.toml); `ssm_llm.config_from_dict` re-exports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ssm_llm.config import ATTENTION_FAMILY, ModelConfig, RopeConfig
from ssm_llm.quant.scheme import QuantizedSSMConfig, QuantScheme
from ssm_llm.ssm_config import SSM_CONFIGS

QUANTIZED_FAMILY = QuantizedSSMConfig.family


def config_from_dict(d: dict[str, Any]):
    """Rebuild a config written by `to_dict` (attention `ModelConfig`, `MambaConfig`, `Mamba2Config` or
    `QuantizedSSMConfig`); unknown keys are an error."""
    if not isinstance(d, dict):
        raise ValueError(f"a saved model config must be a JSON object (dict), got {type(d).__name__}")
    d = dict(d)
    family = d.pop("family", ATTENTION_FAMILY)
    if family == QUANTIZED_FAMILY:
        return _quantized_from_dict(d)
    if family == ATTENTION_FAMILY:
        cls = ModelConfig
    elif family in SSM_CONFIGS:
        cls = SSM_CONFIGS[family]
    else:
        raise ValueError(
            f"unknown model family {family!r} in saved config; known: {', '.join([ATTENTION_FAMILY, *SSM_CONFIGS])}"
        )
    fields = {f.name for f in dataclasses.fields(cls)} - {"family"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown keys in saved {family} model config: {unknown}")
    if cls is ModelConfig:
        rope = d.get("rope", {})
        if not isinstance(rope, dict):
            raise ValueError(f"saved config 'rope' must be a JSON object, got {rope!r}")
        unknown = sorted(set(rope) - {f.name for f in dataclasses.fields(RopeConfig)})
        if unknown:
            raise ValueError(f"unknown keys in saved rope config: {unknown}")
        d["rope"] = RopeConfig(**rope)
    for key in ("layer_windows", "eos_token_ids", "time_step_limit"):
        if key in d:
            if not isinstance(d[key], (list, tuple)):
                raise ValueError(f"saved config {key!r} must be a list, got {d[key]!r}")
            d[key] = tuple(d[key])
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.name != "family"
        and f.name not in d
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"saved {family} model config lacks required keys {missing}")
    return cls(**d)


def _quantized_from_dict(d: dict[str, Any]) -> QuantizedSSMConfig:
    """Inverse of `QuantizedSSMConfig.to_dict` (without its "family" key)."""
    unknown = sorted(set(d) - {"base", "scheme", "simulated"})
    if unknown or "base" not in d or "scheme" not in d:
        raise ValueError(f"saved quantized config must hold 'base' and 'scheme' (unknown keys: {unknown})")
    simulated = d.get("simulated", False)
    if not isinstance(d["scheme"], dict) or not isinstance(simulated, bool):
        raise ValueError(
            f"saved quantized config needs a 'scheme' object and a boolean 'simulated', got "
            f"{d['scheme']!r} and {simulated!r}"
        )
    return QuantizedSSMConfig(config_from_dict(d["base"]), QuantScheme(**d["scheme"]), simulated)
