"""Readers of Hugging Face `config.json` fields that every architecture's mapping shares."""

from __future__ import annotations


def eos_token_ids(value) -> tuple[int, ...]:
    """`eos_token_id` as a tuple: None -> (), an int -> (id,), a list -> its ids."""
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
