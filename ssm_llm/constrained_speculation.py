"""Greedy speculative decoding under a constraint: exactly the tokens of greedy constrained decoding, in fewer
target forwards.

Each round runs `speculative.decode`'s steps with the grammar on the host between them:

1. the drafter proposes a tree (on the device);
2. drafts the grammar refuses are pruned (`Matchers.tree_allows`: one single-token check per node, walking the
   tree); a round where no row keeps a draft scores the root alone;
3. the target scores the tree in one forward and hands back each node's best `awrs.CANDIDATES` tokens;
4. the host walks each row's tree from the root: the target's token at a node is the best token the grammar
   allows there (`awrs.choose_row`: the candidates checked one at a time, the full mask only when all are
   refused), which is greedy masked decoding's token; the child holding it is accepted and the walk goes on,
   otherwise it is the bonus token. The grammar advances along the emitted tokens;
5. the target's cache keeps the accepted path and the drafter updates (on the device).

A draft the grammar refuses could never be accepted (the target's token is always allowed), so pruning only
saves work. Only greedy decoding: under sampling the masked law at every node would need a full mask.

`ForcedTokens` drafts from the grammar itself: where it forces the next bytes (a JSON key, `":`, a closing
brace), their tokens are a chain the target verifies in one forward ("jump-forward" decoding), for any model.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.constraints import Matchers, awrs
from ssm_llm.option_spec import check_int
from ssm_llm.sampling import Sampling
from ssm_llm.speculative import verify
from ssm_llm.speculative.draft_model import roots
from ssm_llm.speculative.protocol import Acceptance, DraftContext
from ssm_llm.speculative.tree import MAX_TREE_NODES, ROOT_PARENT, TREE_BOUND, UNUSED, DraftTree


@flax.struct.dataclass
class ForcedTokens:
    """A drafter for constrained decoding: each round, the tokens the row's grammar forces next (up to
    `num_tokens`, llguidance's canonical tokenization, `Matchers.forced`) as a chain after the root; no draft
    where the next bytes are free. Use it as `GenerationConfig(constraint=..., speculative=ForcedTokens())`
    (greedy); the grammar is on the host, so on the device it proposes an empty tree that the constrained loop
    fills in."""

    num_tokens: int = flax.struct.field(pytree_node=False, default=4)

    def __post_init__(self):
        check_int("ForcedTokens", "num_tokens", self.num_tokens, 1, MAX_TREE_NODES - 1, TREE_BOUND)

    @property
    def tree_size(self) -> int:
        return self.num_tokens + 1

    def init(self, params, config, prompts, lengths, max_len, impl):
        """No state."""
        return ()

    def propose(self, state, context: DraftContext, sampling: Sampling, key) -> tuple[DraftTree, tuple]:
        """The root alone (`fill` adds the forced tokens on the host)."""
        batch = context.lengths.shape[0]
        tokens = jnp.zeros((batch, self.tree_size), jnp.int32).at[:, 0].set(roots(context))
        parents = jnp.full((batch, self.tree_size), UNUSED, jnp.int32).at[:, 0].set(ROOT_PARENT)
        return DraftTree(tokens, parents), state

    def update(self, state, context, tree, logits, acceptance):
        return state

    def fill(self, matchers: Matchers, row: int, tokens: np.ndarray, parents: np.ndarray) -> None:
        """Write `row`'s forced tokens into its tree (`tokens`, `parents` [N], in place) as a chain after the root."""
        forced = matchers.forced(row)[: self.num_tokens]
        tokens[1 : len(forced) + 1] = forced
        parents[1 : len(forced) + 1] = np.arange(len(forced))


@jax.jit
def _propose(drafter, state, context: DraftContext, sampling: Sampling, key):
    return drafter.propose(state, context, sampling, key)


@functools.partial(jax.jit, static_argnames=("config", "impl", "drafts"))
def _verify(params, config, cache, tree: DraftTree, impl: str, drafts: bool):
    """The tree's logits [B, N, V] (only the root's when no row has `drafts`), the scratch, and every node's best
    candidates [B, N, K]."""
    score = verify.tree_logits if drafts else verify.root_logits
    logits, scratch = score(params, config, cache, tree, impl=impl)
    return logits, scratch, awrs.candidates(logits)


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _commit(config, drafter, cache, scratch, state, tree, logits, acceptance: Acceptance, context: DraftContext):
    cache = verify.commit(config, cache, scratch, acceptance.path, acceptance.accepted, context.active)
    return cache, drafter.update(state, context, tree, logits, acceptance)


def _walk(matchers: Matchers, row: int, tokens, parents, best, logits, room: int, eos: tuple[int, ...]):
    """One row's acceptance (step 4 of the module doc), at most `room` tokens: (the accepted nodes after the root,
    the emitted tokens, whether the row's grammar ended it: complete, nothing allowed after it, no EOS id)."""
    node, path, emitted = 0, [], []
    while len(emitted) < room:
        token, ended = awrs.choose_row(matchers, row, best[node], lambda n=node: logits[row, n])
        if ended:
            return path, emitted, True
        emitted.append(token)
        matchers.consume(row, token)
        if token in eos:
            break
        child = next((i for i in range(1, len(tokens)) if parents[i] == node and tokens[i] == token), None)
        if child is None:
            break
        path.append(child)
        node = child
    return path, emitted, False


def _complete(matchers: Matchers, row: int) -> bool:
    """Whether `row`'s grammar takes nothing more and has no EOS id to end with (`Matchers.finished` for one row)."""
    among = np.zeros(len(matchers.rows), bool)
    among[row] = True
    return not matchers.eos and bool(matchers.complete(among)[row])


def decode(
    params,
    config,
    drafter,
    state,
    cache,
    logits,
    history,
    lengths,
    key,
    sampling: Sampling,
    matchers: Matchers,
    *,
    max_new_tokens: int,
    eos: tuple[int, ...],
    impl: str,
):
    """`speculative.decode.speculative_decode` (same arguments) under `matchers`' constraint, greedy only.

    Returns (tokens [B, max_new_tokens] with -1 after a row's end, rounds [B] target forwards per row, accepted
    [B] accepted drafts per row, the drafter's final state, [B] rows ended by their grammar).
    """
    if not sampling.greedy:
        raise ValueError("constrained speculative decoding is greedy only (temperature 0)")
    batch, n = logits.shape[0], drafter.tree_size
    history, lengths = np.array(history), np.array(lengths)
    out = np.full((batch, max_new_tokens), -1, np.int32)
    count, rounds, accepted = (np.zeros(batch, np.int64) for _ in range(3))
    stopped = matchers.finished()  # a grammar of "" alone, without EOS ids
    by_eos = np.zeros(batch, bool)

    def emit(row, tokens):
        out[row, count[row] : count[row] + len(tokens)] = tokens
        history[row, lengths[row] : lengths[row] + len(tokens)] = tokens
        count[row] += len(tokens)
        lengths[row] += len(tokens)
        by_eos[row] |= any(t in eos for t in tokens)

    first, ended = awrs.choose(matchers, logits, np.asarray(awrs.candidates(logits)), stopped)
    stopped |= ended
    for row in np.flatnonzero(first >= 0):
        emit(row, [int(first[row])])
        matchers.consume(row, int(first[row]))
        stopped[row] |= not by_eos[row] and count[row] < max_new_tokens and _complete(matchers, row)
    done = stopped | by_eos | (count >= max_new_tokens)
    while not done.all():
        active = ~done
        key, sub = jax.random.split(key)
        context = DraftContext(jnp.asarray(history), jnp.asarray(lengths, jnp.int32), jnp.asarray(active))
        tree, state = _propose(drafter, state, context, sampling, sub)
        tokens, parents = np.array(tree.tokens), np.array(tree.parents)
        for row in np.flatnonzero(active):
            if isinstance(drafter, ForcedTokens):
                drafter.fill(matchers, row, tokens[row], parents[row])
            parents[row] = np.where(matchers.tree_allows(row, tokens[row], parents[row]), parents[row], UNUSED)
        parents[~active, 1:] = UNUSED
        # The drafter learns from the pruned tree: a pruned node's logits are not a continuation of its path (and
        # are padding in a round scored at the root alone). Kept nodes keep their ancestors, so a draft model's
        # scratch along an accepted path is the one it computed.
        tree = DraftTree(jnp.asarray(tokens), jnp.asarray(parents), tree.child_probs, tree.draw)
        tree_logits, scratch, best = _verify(params, config, cache, tree, impl, bool((parents[:, 1:] >= 0).any()))
        best = np.asarray(best)
        path, taken, bonus = np.zeros((batch, n), np.int32), np.zeros(batch, np.int32), tokens[:, 0].copy()
        for row in np.flatnonzero(active):
            nodes, emitted, ended = _walk(
                matchers, row, tokens[row], parents[row], best[row], tree_logits, max_new_tokens - count[row], eos
            )
            path[row, 1 : len(nodes) + 1], taken[row] = nodes, len(nodes)
            bonus[row] = emitted[-1] if emitted else bonus[row]
            emit(row, emitted)
            # a grammar completed by this round's last token ends its row now (no EOS ids), as masking's would
            stopped[row] |= ended or (not by_eos[row] and count[row] < max_new_tokens and _complete(matchers, row))
        rounds += active
        accepted += taken
        acceptance = Acceptance(jnp.asarray(path), jnp.asarray(taken), jnp.asarray(bonus))
        context = DraftContext(jnp.asarray(history), jnp.asarray(lengths, jnp.int32), jnp.asarray(active))
        cache, state = _commit(config, drafter, cache, scratch, state, tree, tree_logits, acceptance, context)
        done = stopped | by_eos | (count >= max_new_tokens)
    stopped |= matchers.complete(~(stopped | by_eos))  # complete, but no room was left for its EOS
    return out, rounds, accepted, state, stopped
