"""The speculative decode loop: one jitted `lax.while_loop` of draft -> verify -> accept -> commit rounds.

Called by `ssm_llm.generate` when `GenerationConfig(speculative=drafter)` is set, after the same
prefill and first token as plain decoding. Each round a row emits its accepted drafts plus the bonus
token (1 to depth + 1 tokens); rows stop independently at EOS or `max_new_tokens`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.sampling import Sampling
from ssm_llm.speculative import verify
from ssm_llm.speculative.acceptance import accept_greedy, accept_sampling, target_probs
from ssm_llm.speculative.in_place import cond_in_place
from ssm_llm.speculative.protocol import DraftContext


@flax.struct.dataclass
class _Loop:
    out: jax.Array  # [B, max_new + N] emitted tokens, -1 past each row's count
    count: jax.Array  # [B] tokens emitted so far
    done: jax.Array  # [B] bool
    cache: object  # the target's cache: committed tokens except the root
    state: object  # the drafter's state
    history: jax.Array  # [B, S] committed tokens (prompt, then emitted), root at lengths - 1
    lengths: jax.Array  # [B] committed tokens
    key: jax.Array
    rounds: jax.Array  # [B] target forwards while the row was active
    accepted: jax.Array  # [B] drafts accepted in total


def _emitted(tree, acceptance):
    """[B, N] the round's new tokens: the accepted drafts in order, then the bonus, then -1; and their count [B]."""
    n = tree.size
    j = jnp.arange(n)[None, :]
    nodes = jnp.take_along_axis(acceptance.path, jnp.minimum(j + 1, n - 1), axis=1)
    drafts = jnp.take_along_axis(tree.tokens, nodes, axis=1)
    tokens = jnp.where(
        j < acceptance.accepted[:, None],
        drafts,
        jnp.where(j == acceptance.accepted[:, None], acceptance.bonus[:, None], -1),
    )
    return tokens, acceptance.accepted + 1


def _score(params, config, cache, tree, full, like, impl: str):
    """The round's (logits [B, N, V], scratch): the whole tree's where `full`, else the root's alone
    (`verify.root_logits`). Where the scratch is the cache itself (attention: the tree goes into its free slots),
    the choice runs in place (`cond_in_place`; a `lax.cond` copied the cache four times per round), `like`
    (the prefill's logits, [B, V], from the same head) giving the logits' width and type."""

    def whole(c):
        return verify.tree_logits(params, config, c, tree, impl=impl)

    def root(c):
        return verify.root_logits(params, config, c, tree, impl=impl)

    if not verify.scratch_is_cache(config):
        return jax.lax.cond(full, whole, root, cache)
    blank = jnp.zeros((tree.batch, tree.size, like.shape[-1]), like.dtype)  # a [B, N, V] fill per round

    def checked(fn):
        def run(c):
            logits, scratch = fn(c[1])
            if (logits.shape, logits.dtype) != (blank.shape, blank.dtype):
                raise TypeError(
                    f"speculative_decode: the tree's logits are {logits.dtype}{list(logits.shape)}, the prefill's "
                    f"logits {like.dtype}{list(like.shape)}: pass the prefill's logits as the model gives them"
                )
            return logits, scratch

        return run

    return cond_in_place(full, checked(whole), checked(root), (blank, cache))


@functools.partial(jax.jit, static_argnames=("config", "width", "eos", "impl"), donate_argnames=("cache",))
def speculative_decode(
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
    max_new_tokens,
    *,
    width: int,
    eos: tuple[int, ...],
    impl: str,
):
    """Generate up to `max_new_tokens` per row after a prefill, stopping a row at any of the `eos` ids.

    cache: the target's cache holding each row's prompt; logits: [B, V] at each prompt's last token;
    history: [B, S] the prompts right-padded, S >= prompt + max_new_tokens + N; lengths: [B] prompt lengths;
    state: `drafter.init(...)`'s; key: PRNG key; sampling: the target's rule; max_new_tokens: a traced
    int32 scalar, at most the static `width` of the output. Returns (tokens [B, width] with -1 after a row's
    end, the final cache, rounds [B] target forwards per row, accepted [B] accepted drafts per row, the
    drafter's final state).
    """
    batch, n = logits.shape[0], drafter.tree_size
    rows = jnp.arange(batch)[:, None]
    eos_ids = jnp.asarray(eos, jnp.int32) if eos else None

    def is_eos(tok):
        return jnp.zeros(tok.shape, bool) if eos_ids is None else (tok[..., None] == eos_ids).any(-1)

    # The first token comes from the prefill's logits exactly as in plain decoding.
    key, sub = jax.random.split(key)
    first = sampling.draw(logits, sub)
    out = jnp.full((batch, width + n), -1, jnp.int32).at[:, 0].set(first)
    history = history.at[jnp.arange(batch), lengths].set(first)
    done = is_eos(first) | (max_new_tokens <= 1)
    zeros = jnp.zeros((batch,), jnp.int32)
    loop = _Loop(out, jnp.ones((batch,), jnp.int32), done, cache, state, history, lengths + 1, key, zeros, zeros)

    def body(s: _Loop) -> _Loop:
        key, k_draft, k_accept = jax.random.split(s.key, 3)
        active = ~s.done
        tree, state = drafter.propose(s.state, DraftContext(s.history, s.lengths, active), sampling, k_draft)
        # A round where no active row has a draft (prompt lookup without a match, Token Recycling's
        # unknown tokens) scores the root alone: on a CPU the forward's cost grows with the tree size.
        full = jnp.any(tree.used[:, 1:] & active[:, None])
        tree_logits, scratch = _score(params, config, s.cache, tree, full, logits, impl)
        if sampling.greedy:
            acceptance = accept_greedy(tree, tree_logits)
        else:
            acceptance = accept_sampling(tree, target_probs(tree_logits, sampling), k_accept)
        cache = verify.commit(config, s.cache, scratch, acceptance.path, acceptance.accepted, active)

        tokens, count = _emitted(tree, acceptance)
        j = jnp.arange(n)[None, :]
        stop = is_eos(tokens) & (j < count[:, None])
        first_stop = jnp.where(stop.any(1), jnp.argmax(stop, axis=1) + 1, count)  # keep the EOS: it ends the row
        count = jnp.minimum(first_stop, max_new_tokens - s.count)
        count = jnp.where(active, count, 0)
        keep = j < count[:, None]
        out = s.out.at[rows, s.count[:, None] + j].set(jnp.where(keep, tokens, -1), mode="drop")
        history = s.history.at[rows, s.lengths[:, None] + j].set(jnp.where(keep, tokens, 0), mode="drop")
        emitted = s.count + count
        done = s.done | stop.any(1) | (emitted >= max_new_tokens)
        lengths = s.lengths + count
        state = drafter.update(state, DraftContext(history, lengths, active), tree, tree_logits, acceptance)
        return _Loop(
            out,
            emitted,
            done,
            cache,
            state,
            history,
            lengths,
            key,
            s.rounds + active,
            s.accepted + jnp.where(active, acceptance.accepted, 0),
        )

    loop = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, loop)
    return loop.out[:, :width], loop.cache, loop.rounds, loop.accepted, loop.state
