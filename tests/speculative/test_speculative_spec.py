"""Drafters from text specs (the CLI's --speculative) and the shared spec parser."""

import re

import pytest

from ssm_llm.option_spec import _items, parse_spec
from ssm_llm.speculative import PromptLookup, TokenRecycling
from ssm_llm.speculative.spec import parse_drafter


def test_parse_drafter_builds_the_drafters():
    assert parse_drafter("prompt_lookup") == PromptLookup()
    assert parse_drafter("Prompt_Lookup: num_tokens=8, max_ngram=4") == PromptLookup(num_tokens=8, max_ngram=4)
    assert parse_drafter("token_recycling") == TokenRecycling()
    # Values may be tuples: commas inside brackets do not split parameters.
    drafter = parse_drafter("token_recycling:template=((0, 0), (0, 1), (1, 0)),candidates=4")
    assert drafter.template == ((0, 0), (0, 1), (1, 0)) and drafter.candidates == 4 and drafter.tree_size == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ngram", "unknown speculative drafter 'ngram'; choose one of ['prompt_lookup', 'token_recycling']"),
        ("prompt_lookup:tokens=3", "PromptLookup: bad parameter 'tokens=3'"),
        ("prompt_lookup:num_tokens", "PromptLookup: bad parameter 'num_tokens'"),
        ("prompt_lookup:num_tokens=0", "num_tokens must be an int >= 1"),
        ("token_recycling:template=((0, 0), (3, 0))", "template node 2 has parent 3"),
        (
            "token_recycling:adjacency=3",
            "TokenRecycling: bad parameter 'adjacency=3'; parameters are ['candidates', 'template']",
        ),
        ("prompt_lookup:num_tokens=4),max_ngram=2", "unbalanced brackets in 'num_tokens=4),max_ngram=2'"),
        ("token_recycling:template=((0, 0), (0, 1)", "1 bracket(s) left open"),
        ("prompt_lookup:num_tokens=4,num_tokens=5", "parameter 'num_tokens' given twice"),
    ],
)
def test_parse_drafter_names_the_problem(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_drafter(spec)


def test_parse_spec_splits_only_at_top_level_commas():
    assert _items("a=((0,0),(1,0)), b=[1,2],,c={1:2}, ") == ["a=((0,0),(1,0))", "b=[1,2]", "c={1:2}"]
    class_map = {"prompt_lookup": PromptLookup}
    assert parse_spec("prompt_lookup:", class_map, "drafter") == PromptLookup()
    with pytest.raises(ValueError, match="unknown widget 'x'"):
        parse_spec("x:a=(1,2)", class_map, "widget")
