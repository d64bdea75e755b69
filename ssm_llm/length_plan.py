"""The sizes of one generate call: cache positions per row and the padded prompt length.

Sizes are rounded up to buckets so that nearby prompt lengths (and `max_new_tokens`) share one
compiled prefill and one compiled decode loop.
"""

from __future__ import annotations

import dataclasses

from ssm_llm.kv.policy import round_up

PROMPT_BUCKET = 16
CACHE_BUCKET = 64
OUTPUT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class LengthPlan:
    """max_len: cache positions per row (a draft tree's slots included); prompt_len: the padded prompt
    length, the prefill's T; cache_len: positions the dense prefill allocates (max_len, or 1 for a
    state-space cache, which does not grow); capacity: committed tokens a row may hold in the speculative
    loop (max_len - tree_size), None without a drafter."""

    max_len: int
    prompt_len: int
    cache_len: int
    capacity: int | None = None


def plan_lengths(
    longest: int,
    max_new_tokens: int,
    *,
    max_len: int | None = None,
    context: int | None = None,
    state_space: bool = False,
    compressed: bool = False,
    tree_size: int | None = None,
) -> LengthPlan:
    """The sizes for prompts of at most `longest` tokens and `max_new_tokens` new ones.

    max_len: the user's fixed cache size (kept as given), else longest + max_new_tokens rounded up to
    `CACHE_BUCKET` and capped at the model's `context` (None: no limit) unless the cache is `compressed`
    (KV compression may generate past the context). tree_size: a drafter's N; its slots follow each
    row's committed tokens, and the sum is rounded up again. A compressed cache counts decoded tokens from
    the padded prompt on, so it holds at least prompt_len + max_new_tokens.
    """
    if max_len is None:
        max_len = round_up(longest + max_new_tokens, CACHE_BUCKET)
        if context is not None and not compressed:
            max_len = min(max_len, context)
    if tree_size is not None:
        max_len = round_up(max_len + tree_size, CACHE_BUCKET)
    prompt_len = min(round_up(longest, PROMPT_BUCKET), max_len)
    if compressed:
        max_len = max(max_len, prompt_len + max_new_tokens)
    return LengthPlan(
        max_len=max_len,
        prompt_len=prompt_len,
        cache_len=1 if state_space else max_len,
        capacity=None if tree_size is None else max_len - tree_size,
    )


def output_width(max_new_tokens: int) -> int:
    """The decode loops' output buffer width: `max_new_tokens` rounded up to `OUTPUT_BUCKET`. The loops take
    the count itself as a traced value, so `max_new_tokens` values of one bucket share a compiled loop where
    the cache keeps its size too (a fixed `max_len`, a state-space cache, or prompt + new tokens in one
    `CACHE_BUCKET`)."""
    return round_up(max_new_tokens, OUTPUT_BUCKET)
