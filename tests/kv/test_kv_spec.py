"""Policies from text specs (the CLI's --kv-compression and the experiment scripts)."""

import pytest

from ssm_llm.kv import StreamingLLM
from ssm_llm.kv.spec import parse_policy, policy_classes


def test_parses_names_and_literal_parameters():
    assert parse_policy("StreamingLLM:budget=64, sinks=2,positions=original") == StreamingLLM(
        budget=64, sinks=2, positions="original"
    )
    assert parse_policy("streamingllm:budget=8,distance_ceiling=None") == StreamingLLM(budget=8)
    assert "streamingllm" in policy_classes()


@pytest.mark.parametrize(
    "spec,match",
    [
        ("foo:budget=3", "unknown KV compression method 'foo'"),
        ("streamingllm:bugdet=3", "bad parameter 'bugdet=3'"),
        ("streamingllm:budget", "bad parameter 'budget'"),
        ("streamingllm", "missing 1 required positional argument: 'budget'"),
        ("streamingllm:budget=0", "budget must be an int >= 1"),
    ],
)
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_policy(spec)
