"""The one registry of model families: which module runs a config, which cache it keeps, and how
speculative decoding scores a draft tree for it. Each family module registers itself on import."""

from __future__ import annotations

import dataclasses
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family.

    module: implements `param_shapes`, `init_params`, `init_cache` and `hidden_states` with one contract;
    cache_type: the cache `forward` takes; tree_verifier: how a draft tree is scored ("attention": the
    tree's K/V in free cache slots under an ancestor mask; "ssm": one recurrent state per node; None:
    speculative decoding is not supported).
    """

    name: str
    module: ModuleType
    cache_type: type
    tree_verifier: str | None


_FAMILIES: dict[type, Family] = {}


def register(config_type: type, family: Family) -> None:
    """Make `family` run every model whose config is a `config_type`."""
    _FAMILIES[config_type] = family


def family_of(config) -> Family:
    """The family registered for `config`'s type; a TypeError naming the expected types otherwise."""
    family = _FAMILIES.get(type(config))
    if family is not None:
        return family
    hint = (
        (
            "; build one from a dict with ssm_llm.config_from_dict (a saved config) or converters.config_from_hf "
            "(a Hugging Face config.json)"
        )
        if isinstance(config, dict)
        else ""
    )
    known = [t.__name__ for t in _FAMILIES]
    expected = ", ".join(known[:-1]) + f" or {known[-1]}" if len(known) > 1 else "".join(known)
    raise TypeError(f"not a model config: {type(config).__name__} (expected {expected}){hint}")
