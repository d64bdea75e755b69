"""Readers of Hugging Face `config.json` fields that every architecture's mapping shares.

A config file is untrusted input: a value of the wrong type (`"hidden_size": "64"`, `"eos_token_id": "2"`,
`"tie_word_embeddings": "false"`) is an error naming the key, never coerced. A key that is missing or
null takes the default, as transformers does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ssm_llm.validation import as_float, as_int, as_token_ids


def config_dict(value, source: str = "config") -> dict[str, Any]:
    """`value` if it is a JSON object (a dict), else a ValueError naming `source` and what it holds."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{source} holds a {type(value).__name__}, expected a JSON object of settings")
    return dict(value)


def get_int(d: Mapping, key: str, default: int | None = None, minimum: int = 1) -> int | None:
    """`d[key]` as an int >= `minimum` (strings, floats and bools are errors); missing or null -> default."""
    value = d.get(key)
    if value is None:
        return default
    value = as_int(f"config.{key}", value)
    if value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"config.{key} must be {expected}, got {value}")
    return value


def get_float(d: Mapping, key: str, default: float | None = None) -> float | None:
    """`d[key]` as a finite float (strings and bools are errors); missing or null -> default."""
    value = d.get(key)
    return default if value is None else as_float(f"config.{key}", value)


def get_bool(d: Mapping, key: str, default: bool) -> bool:
    """`d[key]` as a bool; 0 and 1 pass, anything else (e.g. the string "false") is an error."""
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"config.{key} must be true or false, got {value!r} ({type(value).__name__})")


def get_dict(d: Mapping, key: str) -> dict[str, Any]:
    """`d[key]` as a dict (a nested JSON object); missing or null -> {}."""
    value = d.get(key)
    return {} if value is None else config_dict(value, f"config.{key}")


def eos_token_ids(d: Mapping) -> tuple[int, ...]:
    """`eos_token_id` as a tuple: missing / null -> (), an int -> (id,), a list -> its ids (each >= 0)."""
    value = d.get("eos_token_id")
    return () if value is None else as_token_ids("config.eos_token_id", value)


def token_id(d: Mapping, key: str) -> int | None:
    """A single token id such as `bos_token_id` (>= 0), or None."""
    return get_int(d, key, None, minimum=0)
