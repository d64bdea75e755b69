"""Lossless speculative decoding: a drafter proposes a token tree, the target verifies it in one forward.

    from ssm_llm.speculative import PromptLookup
    out = ssm_llm.generate(params, config, prompts, ssm_llm.GenerationConfig(speculative=PromptLookup()))

Drafters: `PromptLookup` (n-gram from the context), `TokenRecycling` (adjacency matrix + BFS tree),
`DraftModel` (any ssm_llm model, or the target with layers skipped: `DraftModel.skip_layers`), `RSD`
(Gumbel-top-k tree, recursive rejection) and `DySpec` (dynamic tree by draft probability). See
`protocol` for the round and the drafter contract, `tree` for the draft tree, `acceptance` for the exact
greedy / rejection-sampling rules and `verify` for the target side (attention and state-space).
"""

from ssm_llm.sampling import Sampling
from ssm_llm.speculative.draft_model import DraftModel, self_speculative
from ssm_llm.speculative.dyspec import DySpec
from ssm_llm.speculative.prompt_lookup import PromptLookup
from ssm_llm.speculative.protocol import Acceptance, DraftContext, Drafter
from ssm_llm.speculative.rsd import RSD
from ssm_llm.speculative.token_recycling import WIDE_TEMPLATE, TokenRecycling, bfs_template
from ssm_llm.speculative.tree import DraftTree, chain

__all__ = [
    "Acceptance",
    "DraftContext",
    "DraftModel",
    "DraftTree",
    "Drafter",
    "DySpec",
    "PromptLookup",
    "RSD",
    "Sampling",
    "TokenRecycling",
    "WIDE_TEMPLATE",
    "bfs_template",
    "chain",
    "self_speculative",
]
