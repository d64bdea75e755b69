"""Model families. Each module exposes `init_params` and `hidden_states` with one contract (and `init_cache`
when its cache differs from its base family's)."""

from __future__ import annotations

from types import ModuleType


def family_module(config) -> ModuleType:
    """The module implementing `config`'s model family (attention_lm or mamba_lm)."""
    from ssm_llm.config import ModelConfig
    from ssm_llm.models import attention_lm, mamba_lm
    from ssm_llm.ssm_config import Mamba2Config, MambaConfig

    if isinstance(config, ModelConfig):
        return attention_lm
    if isinstance(config, (MambaConfig, Mamba2Config)):
        return mamba_lm
    from ssm_llm.quant.scheme import QuantizedSSMConfig

    if isinstance(config, QuantizedSSMConfig):
        from ssm_llm.quant import quantized_lm

        return quantized_lm
    hint = ("; build one from a dict with ssm_llm.config_from_dict (a saved config) or converters.config_from_hf "
            "(a Hugging Face config.json)") if isinstance(config, dict) else ""
    raise TypeError(f"not a model config: {type(config).__name__} (expected ModelConfig, MambaConfig, Mamba2Config "
                    f"or QuantizedSSMConfig){hint}")
