"""Train-free drafters from short text specs, for the command line:
`parse_drafter("prompt_lookup:num_tokens=8")` -> `PromptLookup(num_tokens=8)`. The model-based
drafters (DraftModel, RSD, DySpec) need draft weights, so they are built in Python only."""

from __future__ import annotations

from ssm_llm.option_spec import parse_spec
from ssm_llm.speculative.prompt_lookup import PromptLookup
from ssm_llm.speculative.token_recycling import TokenRecycling

DRAFTERS = {"prompt_lookup": PromptLookup, "token_recycling": TokenRecycling}


def parse_drafter(spec: str) -> PromptLookup | TokenRecycling:
    """`"prompt_lookup"`, `"token_recycling"`, or either with `:key=value,...` parameters -> the drafter.
    Raises ValueError naming an unknown drafter or parameter."""
    # A starting adjacency matrix cannot be written as text: pass TokenRecycling(adjacency=...) from Python.
    return parse_spec(spec, DRAFTERS, "speculative drafter", hidden=("adjacency",))
