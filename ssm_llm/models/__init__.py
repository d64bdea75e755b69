"""Model families. Each module exposes `param_shapes`, `init_params`, `init_cache` and `hidden_states` with
one contract and registers itself in `ssm_llm.models.registry` (quantized Mamba registers from
`ssm_llm.quant`)."""

from types import ModuleType

from ssm_llm.models import attention_lm, mamba_lm  # noqa: F401  (importing a family registers it)
from ssm_llm.models.registry import Family, family_of, register

__all__ = ["Family", "family_module", "family_of", "register"]


def family_module(config) -> ModuleType:
    """The module implementing `config`'s model family."""
    return family_of(config).module
