"""Beam search and diverse (group) beam search in one compiled loop over the explicit caches.

The rules are Hugging Face's (`transformers` 5, `_beam_search`), so the outputs match `num_beams`
there: every step keeps the best `max(2, 1 + #EOS) * k` continuations of a group's `k` beams; those
that end (an EOS, or the last allowed token) and rank among the best `k` become finished hypotheses,
scored `sum of log-probabilities / length ** length_penalty`; the best `k` others run on. A prompt
stops when no running beam can beat its worst finished hypothesis (`early_stopping=False`: judged at
the current length; `"never"`: at the longest length when `length_penalty > 0`; `True`: as soon as
`k` hypotheses are finished).

Diverse beam search (Vijayakumar et al., "Diverse Beam Search") splits the beams into groups that
choose in turn at each step; a group's log-probabilities are lowered by `diversity_penalty` times the
number of times each token was already chosen by the earlier groups at this step (Hamming diversity).
With one group it is plain beam search.

The cache rows follow their beams: after each step every row is replaced by its parent's
(`cache.rows(parent)`), for attention (`KVCache`) and state-space (`SSMCache`) models alike.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.models import family_module
from ssm_llm.models.lm_head import logits_from_hidden
from ssm_llm.sampling import is_eos

# A score that no real hypothesis reaches (transformers' -1e9): empty slots and masked candidates.
NEG = -1.0e9
EARLY_STOPPING = (False, True, "never")


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """A beam search rule (static under `jit`): `num_beams` in `num_beam_groups` groups, the diversity
    penalty between groups, the length penalty of finished hypotheses, and when a prompt stops."""

    num_beams: int
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    @property
    def group_size(self) -> int:
        return self.num_beams // self.num_beam_groups

    def token_buffers(self, eos_count: int) -> int:
        """How many [B * num_beams, N] token buffers the search holds at most: the running and finished
        hypotheses, before and after a step, each step's candidates and the finished merge."""
        keep = max(2, 1 + eos_count)  # candidates per beam
        return 4 + keep + (1 + keep)


@flax.struct.dataclass
class Beams:
    """The search's state for B prompts, G groups of k beams, up to N new tokens each.

    tokens / scores: the running hypotheses' new tokens [B, G, k, N] (-1 past their length) and
    sums of log-probabilities [B, G, k], best first in each group. done_tokens / done_scores /
    done: the best finished hypotheses and their length-penalised scores (NEG where a slot holds
    none; `done` marks the real ones). open: [B, G] whether a running beam can still improve the
    finished ones. stuck: every candidate of the last step ended, so none can run on.
    """

    tokens: jax.Array
    scores: jax.Array
    done_tokens: jax.Array
    done_scores: jax.Array
    done: jax.Array
    open: jax.Array
    stuck: jax.Array

    @classmethod
    def start(cls, batch: int, groups: int, k: int, n: int) -> Beams:
        """Only the first beam of each group is live, so the first step does not pick k copies of one token."""
        scores = jnp.zeros((batch, groups, k), jnp.float32).at[:, :, 1:].set(NEG)
        return cls(
            tokens=jnp.full((batch, groups, k, n), -1, jnp.int32),
            scores=scores,
            done_tokens=jnp.full((batch, groups, k, n), -1, jnp.int32),
            done_scores=jnp.full((batch, groups, k), NEG, jnp.float32),
            done=jnp.zeros((batch, groups, k), bool),
            open=jnp.ones((batch, groups), bool),
            stuck=jnp.zeros((), bool),
        )

    def running(self, spec: BeamSearch) -> jax.Array:
        """Whether the loop goes on: some prompt can improve, and some continuation did not end."""
        full = jnp.all(self.done) & (spec.early_stopping is True)
        return jnp.any(self.open) & ~full & ~self.stuck


def _take(x, index):
    """x [B, M, ...] at index [B, M'] along axis 1."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _group_step(logp, group: dict, t, spec: BeamSearch, eos: tuple[int, ...], n: int):
    """One step of one group. logp: [B, k, V] this group's next-token log-probabilities (diversity already
    applied); `group`: this group's slices of `Beams` (tokens [B, k, N], scores, done_tokens, done_scores,
    done [B, k], open [B]); t: how many tokens were generated before. Returns the updated slices, each
    new running beam's parent in the group [B, k], and whether every candidate ended [B]."""
    batch, k, vocab = logp.shape
    keep = max(2, 1 + len(eos)) * k
    total = (logp + group["scores"][..., None]).reshape(batch, k * vocab)
    cand_scores, flat = jax.lax.top_k(total, keep)
    parent, token = flat // vocab, flat % vocab
    cand = jnp.where(jnp.arange(n) == t, token[..., None], _take(group["tokens"], parent))  # [B, keep, N]
    ended = is_eos(token, eos) | (t + 1 >= n)

    runs = cand_scores + NEG * ended
    best = jax.lax.top_k(runs, k)[1]
    tokens, scores, parent = _take(cand, best), _take(runs, best), _take(parent, best)

    just_done = ended & (jnp.arange(keep) < k)  # only the best k candidates may finish
    final = cand_scores / (t + 1).astype(jnp.float32) ** spec.length_penalty
    full = jnp.all(group["done"], axis=-1, keepdims=True) & (spec.early_stopping is True)
    final = final + NEG * full + NEG * ~group["open"][:, None] + NEG * ~just_done
    merged = jnp.concatenate([group["done_scores"], final], axis=1)
    pick = jax.lax.top_k(merged, k)[1]
    done_tokens = _take(jnp.concatenate([group["done_tokens"], cand], axis=1), pick)
    done = _take(jnp.concatenate([group["done"], just_done], axis=1), pick)
    done_scores = _take(merged, pick)

    # Can the best running beam still beat the worst finished one (transformers' early-stop heuristic)?
    length = n if (spec.early_stopping == "never" and spec.length_penalty > 0) else t + 1
    best_possible = scores[:, :1] / jnp.asarray(length, jnp.float32) ** spec.length_penalty
    worst = jnp.where(done, jnp.min(done_scores, axis=-1, keepdims=True), NEG)
    still = group["open"] & jnp.any(best_possible > worst, axis=-1)
    new = dict(tokens=tokens, scores=scores, done_tokens=done_tokens, done_scores=done_scores, done=done, open=still)
    return new, parent, jnp.all(ended, axis=-1)


def select(beams: Beams, logits, t, spec: BeamSearch, eos: tuple[int, ...]):
    """One step of the search from the running beams' logits [B * G * k, V] (rows in (prompt, group, beam)
    order). Returns the new state, each new row's parent row [B * G * k] and its next token [B * G * k]."""
    batch, groups, k, n = beams.tokens.shape
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, groups, k, -1)
    chosen = jnp.zeros((batch, logp.shape[-1]), jnp.float32)  # tokens the earlier groups chose at this step
    fields = ("tokens", "scores", "done_tokens", "done_scores", "done", "open")
    out, parents, stuck = {f: [] for f in fields}, [], []
    for g in range(groups):  # groups choose in turn (static: G is small)
        group = {f: getattr(beams, f)[:, g] for f in fields}
        new, parent, ended = _group_step(logp[:, g] - spec.diversity_penalty * chosen[:, None], group, t, spec, eos, n)
        chosen = chosen + jax.nn.one_hot(new["tokens"][:, :, t], logp.shape[-1]).sum(1)
        for f in fields:
            out[f].append(new[f])
        parents.append(parent + g * k)
        stuck.append(ended)
    state = Beams(**{f: jnp.stack(out[f], axis=1) for f in fields}, stuck=jnp.all(jnp.stack(stuck)))
    parent_rows = (jnp.stack(parents, axis=1) + jnp.arange(batch)[:, None, None] * groups * k).reshape(-1)
    return state, parent_rows, state.tokens[..., t].reshape(-1)


@functools.partial(jax.jit, static_argnames=("config", "spec", "max_new_tokens", "eos", "impl"))
def beam_search(params, config, cache, logits, spec: BeamSearch, *, max_new_tokens: int, eos, impl: str):
    """Beam search after a prefill of B prompts: `cache` holds their B rows, `logits` [B, V] are at each
    prompt's last token. Returns the finished hypotheses of every prompt, best first: (tokens
    [B, num_beams, max_new_tokens], -1 past a hypothesis' end; scores [B, num_beams], length-penalised
    sums of log-probabilities)."""
    batch = logits.shape[0]
    groups, k = spec.num_beam_groups, spec.group_size
    copies = jnp.repeat(jnp.arange(batch), spec.num_beams)  # every prompt's row once per beam
    cache = cache.rows(copies)
    beams, parents, token = select(
        Beams.start(batch, groups, k, max_new_tokens), logits[copies], jnp.int32(0), spec, eos
    )

    def body(state):
        t, beams, parents, token, cache = state
        cache = cache.rows(parents)
        h, cache = family_module(config).hidden_states(
            params, config, token[:, None], cache, jnp.ones_like(token), impl
        )
        beams, parents, token = select(beams, logits_from_hidden(params, config, h[:, 0]), t, spec, eos)
        return t + 1, beams, parents, token, cache

    state = jax.lax.while_loop(lambda state: state[1].running(spec), body, (jnp.int32(1), beams, parents, token, cache))
    beams = state[1]
    scores = beams.done_scores.reshape(batch, -1)
    order = jnp.argsort(-scores, axis=-1, stable=True)  # groups' hypotheses merged, best first
    return _take(beams.done_tokens.reshape(batch, spec.num_beams, -1), order), _take(scores, order)
