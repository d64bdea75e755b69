"""The contracts between the speculative decoding loop, the drafters and the verifier.

Every round of `ssm_llm.speculative.generate`:

1. `tree, state = drafter.propose(state, context, sampling, key)` proposes a `DraftTree` whose root is
   the last committed token;
2. the target scores the whole tree in one forward (`verify.tree_logits`), logits `[B, N, V]`;
3. acceptance picks, per row, the accepted path and a bonus token (`Acceptance`);
4. the target cache keeps the root and the accepted path (`verify.commit`); the bonus token becomes
   the next root;
5. `state = drafter.update(state, context, tree, logits, acceptance)` lets the drafter learn from the
   verification (Token Recycling's adjacency matrix) and roll its own cache forward (draft models).

Drafters are `flax.struct` dataclasses: arrays (a draft model's params) are pytree fields and options
(tree size, n-gram length, ...) static fields, so a drafter passes through `jax.jit` as an argument.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import flax.struct
import jax

from ssm_llm.sampling import Sampling
from ssm_llm.speculative.tree import DraftTree


@flax.struct.dataclass
class DraftContext:
    """The committed text of every row, as the drafter sees it at the start (propose) or end (update)
    of a round.

    history: [B, S] int32, the prompt then the generated tokens; entries at and past `lengths[b]` are
    unspecified. lengths: [B] int32, committed tokens per row; the root (last committed token, not yet
    in the target's cache) is `history[b, lengths[b] - 1]`. active: [B] bool, rows still generating
    (a finished row's tree is verified but its result discarded).
    """

    history: jax.Array
    lengths: jax.Array
    active: jax.Array


@flax.struct.dataclass
class Acceptance:
    """The result of verifying a tree, per row.

    path: [B, N] int32 node indices, `path[b, 0] = 0` (the root) then the accepted drafts in depth
    order (entries past `accepted[b]` are unspecified); accepted: [B] int32 number of accepted drafts
    (0..depth of the tree); bonus: [B] int32, the token drawn from the target after the last accepted
    node (the correction when a draft was rejected) — the next root.
    """

    path: jax.Array
    accepted: jax.Array
    bonus: jax.Array


@runtime_checkable
class Drafter(Protocol):
    """What the speculative loop needs of a drafter (see the module doc for the round)."""

    @property
    def tree_size(self) -> int:
        """N, the number of tree nodes including the root (static)."""

    def init(self, params: dict, config, prompts: jax.Array, lengths: jax.Array, max_len: int, impl: str):
        """The drafter's state pytree after the target's prefill. prompts: [B, T] right-padded, lengths: [B];
        max_len: the most committed tokens a row will hold (prompt + new tokens)."""

    def propose(self, state, context: DraftContext, sampling: Sampling, key: jax.Array) -> tuple[DraftTree, object]:
        """A draft tree rooted at each row's last committed token, and the new state. `sampling` is the
        target's rule (`ssm_llm.sampling.Sampling`): a sampled drafter draws at `sampling.temperature`
        and records its law in the tree; greedy (`sampling.greedy`) drafters pick their best tokens."""

    def update(self, state, context: DraftContext, tree: DraftTree, logits: jax.Array, acceptance: Acceptance):
        """The state after verification; `context` already holds the accepted tokens and the bonus
        (the new root); `logits: [B, N, V]` are the target's logits at every tree node."""
