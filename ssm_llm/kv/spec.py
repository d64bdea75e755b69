"""Policies from short text specs, for the command line and experiment scripts:
`parse_policy("snapkv:budget=256,window=32")` -> `SnapKV(budget=256, window=32)`."""

from __future__ import annotations

from ssm_llm.kv.policy import KVPolicy
from ssm_llm.option_spec import parse_spec


def policy_classes() -> dict[str, type]:
    """Every KV policy class, by lower-case name."""
    import ssm_llm.kv as kv  # the package exports every method

    classes = (getattr(kv, name) for name in kv.__all__)
    return {
        cls.__name__.lower(): cls
        for cls in classes
        if isinstance(cls, type) and issubclass(cls, KVPolicy) and cls is not KVPolicy
    }


def parse_policy(spec: str) -> KVPolicy:
    """`"name"` or `"name:key=value,key=value"` (values are Python literals or bare words) -> a policy.
    Raises ValueError naming an unknown method or parameter."""
    return parse_spec(spec, policy_classes(), "KV compression method")
