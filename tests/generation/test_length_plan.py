"""plan_lengths: today's cache and prompt sizes of a generate call (bucketing, context cap, state-space
caches, draft-tree slots, compressed caches). Pure Python."""

import dataclasses

import pytest

from ssm_llm.length_plan import CACHE_BUCKET, OUTPUT_BUCKET, PROMPT_BUCKET, LengthPlan, output_width, plan_lengths


def test_default_sizes_are_bucketed():
    assert plan_lengths(10, 20) == LengthPlan(max_len=64, prompt_len=16, cache_len=64, capacity=None)
    assert plan_lengths(40, 24).max_len == 64  # exactly a bucket
    assert plan_lengths(40, 25).max_len == 128
    assert plan_lengths(17, 5).prompt_len == 32


def test_nearby_requests_share_sizes():
    """Every prompt of 1..16 tokens with 1..40 new tokens gets one plan: one compiled prefill and loop."""
    plans = {plan_lengths(longest, new) for longest in range(1, PROMPT_BUCKET + 1) for new in range(1, 41)}
    assert plans == {LengthPlan(max_len=CACHE_BUCKET, prompt_len=PROMPT_BUCKET, cache_len=CACHE_BUCKET)}


def test_context_caps_the_default_cache_only():
    assert plan_lengths(50, 40, context=100) == LengthPlan(max_len=100, prompt_len=64, cache_len=100)
    assert plan_lengths(50, 40, context=1000).max_len == 128
    assert plan_lengths(50, 40, max_len=110, context=100).max_len == 110  # a fixed max_len is kept as given


def test_fixed_max_len_is_not_bucketed_and_bounds_the_prompt():
    assert plan_lengths(10, 20, max_len=70) == LengthPlan(max_len=70, prompt_len=16, cache_len=70)
    assert plan_lengths(60, 2, max_len=62).prompt_len == 62  # round_up(60, 16) = 64 would not fit


def test_state_space_cache_holds_one_position():
    assert plan_lengths(10, 20, state_space=True) == LengthPlan(max_len=64, prompt_len=16, cache_len=1)


def test_draft_tree_slots_follow_the_committed_tokens():
    assert plan_lengths(10, 20, tree_size=8) == LengthPlan(max_len=128, prompt_len=16, cache_len=128, capacity=120)
    assert plan_lengths(10, 20, max_len=70, tree_size=8).max_len == 128  # a fixed max_len + the tree, rounded up
    assert plan_lengths(50, 40, context=100, tree_size=8).max_len == 128  # capped to 100, then + 8 rounded up
    plan = plan_lengths(10, 20, state_space=True, tree_size=4)
    assert (plan.cache_len, plan.capacity) == (1, plan.max_len - 4)


def test_compressed_cache_counts_new_tokens_from_the_padded_prompt():
    # ignores the context (StreamingLLM generates past it); prompt_len 112 + 10 <= 128 already
    assert plan_lengths(100, 10, context=64, compressed=True) == LengthPlan(max_len=128, prompt_len=112, cache_len=128)
    # a fixed max_len of exactly longest + new is grown to the padded prompt + new
    assert plan_lengths(90, 10, max_len=100, compressed=True) == LengthPlan(max_len=106, prompt_len=96, cache_len=106)


def test_plan_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan_lengths(10, 20).max_len = 1


def test_every_max_new_tokens_of_a_bucket_shares_one_output_width():
    assert {output_width(n) for n in range(1, OUTPUT_BUCKET + 1)} == {OUTPUT_BUCKET}
    assert output_width(OUTPUT_BUCKET + 1) == 2 * OUTPUT_BUCKET
