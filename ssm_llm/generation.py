"""Batched generation: one jitted prefill, then one jitted `lax.while_loop` of decode steps.

Prompts are ragged: they are right-padded into one batch and every sequence continues from its own
length, stops at its own EOS, and is returned without padding.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm import constrained_speculation
from ssm_llm.beam_search import BeamSearch, beam_search
from ssm_llm.compressed_cache import KVPolicy
from ssm_llm.config import ModelConfig
from ssm_llm.constraints import Constraint, Matchers, awrs
from ssm_llm.kv.policy import describe as describe_policy
from ssm_llm.kv.policy import memory_bound
from ssm_llm.kv.prefill import prefill as kv_prefill
from ssm_llm.length_plan import LengthPlan, output_width, plan_lengths
from ssm_llm.memory import check_fits
from ssm_llm.model import check_sequence_parallel, init_cache
from ssm_llm.models import family_module
from ssm_llm.models.lm_head import activation_dtype, logits_from_hidden
from ssm_llm.param_check import check_params
from ssm_llm.sampling import Sampling, is_eos
from ssm_llm.sharding import SequenceParallel
from ssm_llm.sparse_prefill import SparsePrefill
from ssm_llm.speculative.decode import speculative_decode
from ssm_llm.speculative.protocol import Drafter
from ssm_llm.validation import as_float, as_int, as_token_ids

# A stated ceiling on new tokens per call. State-space models have no context to bound max_new_tokens, and
# a mistaken 10**9 would allocate a [B, 10**9] output buffer and decode for days; 2**20 tokens is already
# about three hours at 100 tokens/s.
MAX_NEW_TOKENS = 2**20
# Without jax_enable_x64 a PRNG key keeps 32 bits of its seed: larger or negative seeds would silently
# collide with smaller ones (seed 2**32 draws exactly what seed 0 draws).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    temperature 0 is greedy decoding; otherwise tokens are sampled after the top-k (0/None: off),
    top-p (1.0: off) and min-p (0.0: off) filters. `eos_token_ids=None` uses the model config's.
    `max_len` fixes the cache size (default: longest prompt + max_new_tokens, rounded up).
    `kv_compression`: a KV-cache compression policy from `ssm_llm.kv` (attention models only), e.g.
    `StreamingLLM(budget=256)` or `SnapKV(budget=0.25)`; the prompt is prefilled with full attention,
    compressed, and every decode step attends to the compressed cache.
    `speculative`: a drafter from `ssm_llm.speculative` (e.g. `PromptLookup()`, `TokenRecycling()`,
    `DraftModel(draft_params, draft_config)`); the target verifies each draft tree in one forward and
    the output is exactly that of plain decoding (greedy: the same tokens; sampling: the same law).
    With a `constraint` (greedy only): drafts the grammar refuses are pruned, and
    `constrained_speculation.ForcedTokens()` drafts the tokens the grammar forces.
    `sparse_prefill`: a sparse prefill method (attention models), e.g. `ssm_llm.kv.MInference()` or
    `MInference.load(patterns_json)`: the prompt's attention on a per-head sparse pattern, for long prompts
    (an approximation: the output may differ from full attention's).
    `num_beams` > 1: beam search (greedy, temperature 0), transformers' rules: finished hypotheses are scored
    sum of log-probabilities / length ** `length_penalty`; `early_stopping` False (stop when no running beam
    can beat the worst finished one at the current length), True (as soon as num_beams are finished) or
    "never". `num_beam_groups` > 1 with `diversity_penalty` > 0: diverse beam search (groups choose in turn,
    each token's log-probability lowered by the penalty times the times earlier groups chose it this step;
    hypotheses are ranked by these penalised sums).
    The result's `tokens` hold the best hypothesis; `beams` all of them.
    `constraint`: structured output, e.g. `ssm_llm.constraints.JSONSchema(schema, tokenizer)`, `Regex(...)`
    or `Grammar(lark)`: each step draws only among the tokens whose text keeps the output in the language
    (masked logits; the law is the model's renormalised over the allowed tokens); EOS ids are allowed once
    the output is complete. A row whose grammar can take nothing more ends there (finish reason "eos" by
    its EOS; "constraint" without EOS ids, or with no room left for one). Decodes one compiled step at a
    time (masks are computed on the host between steps).
    `constrained_sampling`: how the constraint is applied. "mask" evaluates it on the whole vocabulary each
    step; "awrs" (adaptive rejection sampling, Lipkin et al. 2025) checks the model's best perturbed tokens one
    at a time and keeps the first allowed one: the same law (with the same seed, the same tokens up to
    floating-point differences between the two compiled steps) after a few evaluations instead of a
    vocabulary's; temperature only (top-k / top-p / min-p change which tokens count).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] | None = None
    max_len: int | None = None
    kv_compression: KVPolicy | None = None
    speculative: Drafter | None = None
    sparse_prefill: SparsePrefill | None = None
    num_beams: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    constraint: Constraint | None = None
    constrained_sampling: str = "mask"

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("max_new_tokens", as_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS))
        put("temperature", as_float("temperature", self.temperature, 0.0))
        if self.top_k is not None:
            put("top_k", as_int("top_k", self.top_k, 0))
        put("top_p", as_float("top_p", self.top_p, 0.0, 1.0, open_min=True))
        put("min_p", as_float("min_p", self.min_p, 0.0, 1.0, open_max=True))
        put("seed", as_int("seed", self.seed, 0, MAX_SEED))
        if self.eos_token_ids is not None:
            put("eos_token_ids", as_token_ids("eos_token_ids", self.eos_token_ids))
        if self.max_len is not None:
            put("max_len", as_int("max_len", self.max_len, 1))
        if self.kv_compression is not None and not isinstance(self.kv_compression, KVPolicy):
            raise ValueError(
                f"kv_compression must be None or a policy from ssm_llm.kv (e.g. "
                f"StreamingLLM(budget=256)), got {self.kv_compression!r}"
            )
        if self.speculative is not None and not isinstance(self.speculative, Drafter):
            raise ValueError(
                f"speculative must be None or a drafter from ssm_llm.speculative (e.g. PromptLookup()), "
                f"got {self.speculative!r}"
            )
        if self.sparse_prefill is not None and not isinstance(self.sparse_prefill, SparsePrefill):
            raise ValueError(
                f"sparse_prefill must be None or a sparse prefill method from ssm_llm.kv (e.g. MInference()), "
                f"got {self.sparse_prefill!r}"
            )
        self._check_beams(put)
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(
                f"constraint must be None or one of ssm_llm.constraints' Regex, JSONSchema or Grammar, got "
                f"{self.constraint!r}"
            )
        self._check_constrained_sampling()
        if self.constraint is not None and self.num_beams > 1:
            raise ValueError("constraint does not combine with num_beams > 1 yet")
        if isinstance(self.speculative, constrained_speculation.ForcedTokens) and self.constraint is None:
            raise ValueError("speculative=ForcedTokens() drafts the tokens a constraint forces: set constraint= too")
        if self.constraint is not None and self.speculative is not None and self.temperature > 0:
            raise ValueError(
                "constraint with speculative decoding is greedy only (temperature 0): the masked law at every "
                "node of a draft tree would take a full mask per node"
            )
        if self.speculative is not None and self.kv_compression is not None:
            raise ValueError(
                "speculative decoding verifies draft trees on a dense cache; it does not combine with "
                "kv_compression yet"
            )

    def _check_constrained_sampling(self) -> None:
        if self.constrained_sampling not in ("mask", "awrs"):
            raise ValueError(f"constrained_sampling must be 'mask' or 'awrs', got {self.constrained_sampling!r}")
        if self.constrained_sampling == "mask":
            return
        if self.constraint is None:
            raise ValueError("constrained_sampling='awrs' samples under a constraint: set constraint= too")
        filters = {"top_k": bool(self.top_k), "top_p": self.top_p < 1.0, "min_p": self.min_p > 0}
        if self.temperature > 0 and any(filters.values()):
            raise ValueError(
                f"constrained_sampling='awrs' samples from the model's law at a temperature; "
                f"{', '.join(k for k, v in filters.items() if v)} would be computed among the allowed tokens "
                "only, which rejection cannot know: use constrained_sampling='mask'"
            )

    def _check_beams(self, put) -> None:
        put("num_beams", as_int("num_beams", self.num_beams, 1))
        put("num_beam_groups", as_int("num_beam_groups", self.num_beam_groups, 1, self.num_beams))
        put("diversity_penalty", as_float("diversity_penalty", self.diversity_penalty, 0.0))
        put("length_penalty", as_float("length_penalty", self.length_penalty))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams % self.num_beam_groups:
            raise ValueError(
                f"num_beam_groups ({self.num_beam_groups}) must divide num_beams ({self.num_beams}): "
                f"every group has the same number of beams"
            )
        if self.num_beam_groups > 1 and self.diversity_penalty == 0:
            raise ValueError("num_beam_groups > 1 needs diversity_penalty > 0: without it the groups search alike")
        if self.diversity_penalty > 0 and self.num_beam_groups == 1:
            raise ValueError("diversity_penalty acts between beam groups: set num_beam_groups > 1")
        if self.num_beams == 1:
            if self.length_penalty != 1.0 or self.early_stopping is not False:
                raise ValueError("length_penalty and early_stopping act in beam search only: set num_beams > 1")
            return
        clashes = {
            "temperature > 0": self.temperature > 0,
            "speculative": self.speculative is not None,
            "kv_compression": self.kv_compression is not None,
        }
        for name, clash in clashes.items():
            if clash:
                raise ValueError(f"beam search (num_beams > 1) does not combine with {name} yet")

    @property
    def beam_search(self) -> BeamSearch | None:
        """The beam search rule, or None for plain decoding (num_beams 1)."""
        if self.num_beams == 1:
            return None
        return BeamSearch(
            self.num_beams, self.num_beam_groups, self.diversity_penalty, self.length_penalty, self.early_stopping
        )


@dataclasses.dataclass(frozen=True)
class BeamHypotheses:
    """Beam search's finished hypotheses, per prompt and best first: sequences[i][j] the new tokens (EOS
    excluded), scores[i][j] the sum of their log-probabilities / length ** length_penalty (the length
    counts the EOS; with diverse beam search the sum includes the diversity penalties the tokens took, as
    in transformers' group beam search), finish_reasons[i][j] "eos" or "length"."""

    sequences: list[list[list[int]]]
    scores: list[list[float]]
    finish_reasons: list[list[str]]


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
    """Per prompt: rounds[i] target forwards of the speculative loop (the prefill not counted) and
    accepted[i] draft tokens accepted in them. drafter_state: the drafter's state at the end, e.g.
    Token Recycling's adjacency matrix, to start the next call from (`TokenRecycling(adjacency=...)`)."""

    rounds: list[int]
    accepted: list[int]
    drafter_state: object = None

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens emitted per target forward over the batch (accepted drafts + one bonus each round)."""
        rounds = sum(self.rounds)
        return (sum(self.accepted) + rounds) / rounds if rounds else float("nan")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """tokens[i]: the new tokens of prompt i (EOS excluded); finish_reasons[i]: "eos", "length" or (a
    constraint's grammar complete, with no EOS id or no room left to end it) "constraint".

    prefill_seconds / decode_seconds are wall-clock times of the two phases (compilation included
    on a first call with new shapes). speculative: acceptance statistics when a drafter was used.
    beams: every finished hypothesis of a beam search (`tokens` holds the best of each prompt).
    constraint_evaluations: with a constraint, on how many tokens it was evaluated in all (a mask counts the
    tokenizer's whole vocabulary, a rejection-sampling check one token).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    prefill_seconds: float
    decode_seconds: float
    speculative: SpeculativeStats | None = None
    beams: BeamHypotheses | None = None
    constraint_evaluations: int | None = None


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """`prompts` (token-id lists, or a [B, T] array) as lists of ints; ValueError naming a bad prompt
    (empty, not flat ints, an id outside the vocabulary)."""
    if isinstance(prompts, jax.Array):  # a [B, T] device array of ids: read it like a numpy one
        prompts = np.asarray(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)) or not len(prompts):
        raise ValueError(
            "prompts must be a non-empty list of token-id lists (tokenize text first, e.g. tokenizer(text).input_ids)"
        )
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, numbers.Integral):
            raise ValueError("prompts must be a list of token-id lists; wrap a single prompt as [ids]")
        if isinstance(prompt, (str, bytes)):
            raise ValueError(f"prompt {i} is text ({prompt[:20]!r}); pass token ids, e.g. tokenizer(text).input_ids")
        try:
            ids = np.asarray(prompt)
        except (ValueError, TypeError):
            ids = np.asarray(prompt, dtype=object)
        if ids.ndim != 1 or (ids.size and (ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer))):
            raise ValueError(f"prompt {i} must be a flat list of int token ids, got {_preview(prompt)}")
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} holds token id {int(bad[0])}, outside the vocabulary [0, {vocab_size})")
        out.append(ids.astype(np.int32).tolist())
    return out


def _preview(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@functools.partial(
    jax.jit, static_argnames=("config", "max_len", "impl", "cache_dtype", "sequence_parallel", "sparse_prefill")
)
def _prefill(params, config, tokens, counts, max_len, impl, cache_dtype, sequence_parallel=None, sparse_prefill=None):
    cache = init_cache(config, tokens.shape[0], max_len, cache_dtype)
    sparse = {} if sparse_prefill is None else {"sparse_prefill": sparse_prefill}  # attention models only
    h, cache = family_module(config).hidden_states(
        params, config, tokens, cache, counts, impl, cache_is_empty=True, sequence_parallel=sequence_parallel, **sparse
    )
    last = jnp.take_along_axis(h, (counts - 1)[:, None, None], axis=1)[:, 0]
    return logits_from_hidden(params, config, last), cache


def _allowed(logits, mask):
    """logits [B, V] with the tokens outside `mask` [B, V] bool (a constraint's; None: every token) at -inf."""
    return logits if mask is None else jnp.where(mask, logits, -jnp.inf)


def _first_token(logits, key, sampling: Sampling, eos: tuple[int, ...], mask=None):
    """The token drawn from the prefill's logits [B, V] (among `mask`'s tokens): (token [B], done [B], key)."""
    key, sub = jax.random.split(key)
    tok = sampling.draw(_allowed(logits, mask), sub)
    return tok, is_eos(tok, eos), key


def _next_logits(params, config, cache, tok, impl: str):
    """Feed one token per row `tok` [B]: (the next-token logits [B, V], the cache)."""
    h, cache = family_module(config).hidden_states(
        params, config, tok[:, None], cache, jnp.ones((tok.shape[0],), jnp.int32), impl
    )
    return logits_from_hidden(params, config, h[:, 0]), cache


def _step(params, config, cache, tok, done, key, sampling: Sampling, eos: tuple[int, ...], impl: str, mask=None):
    """One decode step after `tok` [B], drawing among `mask`'s tokens [B, V] (None: all): (new tokens [B], -1
    for rows already done; the next input tokens; the cache; done; key)."""
    logits, cache = _next_logits(params, config, cache, tok, impl)
    key, sub = jax.random.split(key)
    new = sampling.draw(_allowed(logits, mask), sub)
    new = jnp.where(done, -1, new)  # finished sequences emit nothing
    return new, jnp.where(done, tok, new), cache, done | is_eos(new, eos), key


@functools.partial(jax.jit, static_argnames=("config", "width", "eos", "impl"), donate_argnames=("cache",))
def _decode(params, config, cache, logits, key, sampling: Sampling, max_new_tokens, *, width: int, eos, impl: str):
    """Decode up to `max_new_tokens` (a traced int32 scalar, at most `width`) tokens per row after a prefill,
    stopping a row at any of the `eos` ids, in one compiled loop. logits: [B, V] at each prompt's last token;
    key: PRNG key. Returns (tokens [B, width] with -1 after a row's end, the final cache)."""
    tok, done, key = _first_token(logits, key, sampling, eos)
    out = jnp.full((logits.shape[0], width), -1, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, cache, done, out, key = state
        new, tok, cache, done, key = _step(params, config, cache, tok, done, key, sampling, eos, impl)
        return step + 1, tok, cache, done, jax.lax.dynamic_update_slice(out, new[:, None], (0, step)), key

    state = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, done, out, key))
    return state[4], state[2]  # returning the cache lets XLA reuse the donated buffers in place


_first_token_jit = jax.jit(_first_token, static_argnames="eos")
_step_jit = jax.jit(_step, static_argnames=("config", "eos", "impl"), donate_argnames=("cache",))


def _decode_streamed(
    params, config, cache, logits, key, sampling: Sampling, on_token, *, max_new_tokens, eos, impl, matchers=None
):
    """`_decode` one compiled step at a time, handing each step's tokens [B] (-1 for finished rows) to
    `on_token(step, tokens)` (if given) as they are drawn: the same steps and keys as `_decode`, so the same
    tokens up to floating-point differences between the two separately compiled programs (equal on the tests'
    models). The step program has no host callback, so JAX's persistent compilation cache can keep it.
    If `on_token` raises, decoding stops there and the exception propagates.

    `matchers` (a constraint's `Matchers`): each step draws among the tokens its grammar allows (masks computed
    here, on the host, between steps); a row whose grammar is complete and has no EOS id to end with stops.
    Returns (tokens [B, max_new_tokens], -1 after a row's end; [B] rows stopped by their grammar)."""
    batch = logits.shape[0]
    stopped = np.zeros(batch, bool) if matchers is None else matchers.finished()  # a grammar of "" alone
    mask = None if matchers is None else jnp.asarray(matchers.masks(stopped))
    tok, done, key = _first_token_jit(logits, key, sampling, eos, mask)
    done = done | jnp.asarray(stopped)
    out = np.full((batch, max_new_tokens), -1, np.int32)
    out[:, 0] = np.where(stopped, -1, np.asarray(tok))
    if on_token is not None:
        on_token(0, out[:, 0].copy())
    for step in range(1, max_new_tokens):
        if matchers is not None:
            done, stopped, mask = _constrain(matchers, out[:, step - 1], done, stopped)
        if np.asarray(done).all():
            break
        new, tok, cache, done, key = _step_jit(params, config, cache, tok, done, key, sampling, eos, impl, mask)
        out[:, step] = np.asarray(new)
        if on_token is not None:
            on_token(step, out[:, step].copy())
    if matchers is not None:  # the last token; a row whose grammar is complete but had no room for its EOS
        matchers.advance(out[:, max_new_tokens - 1])
        stopped |= matchers.complete(~np.asarray(done))
    return out, stopped


def _constrain(matchers, last, done, stopped):
    """Move the grammars past each row's `last` token [B]; rows whose grammar is complete without an EOS id to
    end with stop. Returns (done, stopped, the next step's mask)."""
    matchers.advance(last)
    stopped = stopped | (matchers.finished() & ~np.asarray(done))
    done = done | jnp.asarray(stopped)
    return done, stopped, jnp.asarray(matchers.masks(np.asarray(done)))


def _awrs_first(logits, key, sampling: Sampling):
    """The prefill's perturbed scores [B, V] and their best candidates [B, K] (see `constraints.awrs`), key."""
    key, sub = jax.random.split(key)
    return *awrs.propose(logits, sub, sampling), key


def _awrs_step(params, config, cache, tok, key, sampling: Sampling, impl: str):
    """One forward after `tok` [B]: (perturbed scores [B, V], their best candidates [B, K], the cache, key);
    the same key splits as `_step`, so the same noise as its draw."""
    logits, cache = _next_logits(params, config, cache, tok, impl)
    scores, best, key = _awrs_first(logits, key, sampling)
    return scores, best, cache, key


_awrs_first_jit = jax.jit(_awrs_first)
_awrs_step_jit = jax.jit(_awrs_step, static_argnames=("config", "impl"), donate_argnames=("cache",))


def _decode_awrs(
    params, config, cache, logits, key, sampling: Sampling, on_token, *, max_new_tokens, eos, impl, matchers
):
    """`_decode_streamed` under a constraint by rejection sampling (`constraints.awrs`): each step the device
    returns every row's best perturbed tokens and the host keeps the first its grammar accepts. Returns
    (tokens [B, max_new_tokens], -1 after a row's end; [B] rows stopped by their grammar)."""
    batch = logits.shape[0]
    stopped = matchers.finished()  # a grammar of "" alone, without EOS ids
    done = stopped.copy()
    out = np.full((batch, max_new_tokens), -1, np.int32)
    tok = np.zeros(batch, np.int32)
    scores, best, key = _awrs_first_jit(logits, key, sampling)
    for step in range(max_new_tokens):
        if step:
            if done.all():
                break
            scores, best, cache, key = _awrs_step_jit(params, config, cache, jnp.asarray(tok), key, sampling, impl)
        new, ended = awrs.choose(matchers, scores, np.asarray(best), done)
        stopped |= ended  # complete, nothing allowed after, no EOS id: ends as masking's `finished` would
        done |= ended
        if not (new >= 0).any():  # every row finished or ended
            break
        out[:, step] = new
        if on_token is not None:
            on_token(step, new.copy())
        done = done | np.isin(new, eos)
        tok = np.where(new >= 0, new, tok)  # finished rows keep feeding their last token
        matchers.advance(new)
        stopped |= matchers.stopped() & ~done  # llguidance's own flag: cheap, no mask
        done |= stopped
    stopped |= matchers.complete(~done)  # complete, but no room was left for its EOS
    return out, stopped


@dataclasses.dataclass(frozen=True)
class _Request:
    """A checked request: the prompts as token-id lists and the EOS ids that end a row."""

    prompts: list[list[int]]
    eos: tuple[int, ...]

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def padded(self, width: int) -> np.ndarray:
        """The prompts right-padded with 0: int32 [B, width]."""
        tokens = np.zeros((len(self.prompts), width), np.int32)
        for row, prompt in enumerate(self.prompts):
            tokens[row, : len(prompt)] = prompt
        return tokens


def generate(
    params: dict,
    config,
    prompts: Sequence[Sequence[int]],
    gen_config: GenerationConfig = GenerationConfig(),
    *,
    on_token: Callable[[int, np.ndarray], None] | None = None,
    impl: str = "auto",
    sequence_parallel: SequenceParallel | None = None,
) -> GenerationResult:
    """Generate continuations of a ragged batch of token-id prompts.

    `on_token(step, tokens)` (optional) is called as each step's tokens `[B]` are drawn (-1 for finished
    sequences), e.g. to stream text: decoding then runs one compiled step at a time (a program without
    host callbacks, which JAX's persistent compilation cache can keep). If it raises, decoding stops and
    `generate` re-raises its exception.

    Everything is checked before anything is compiled: params against `config`, prompts, EOS ids and
    sizes against the vocabulary and the model's context, and the memory of the cache, the output buffer
    and draft trees against the device's free memory (a MemoryError names the option responsible).

    `sequence_parallel` (an `ssm_llm.sharding.SequenceParallel`): the prompts' prefill split over a mesh
    axis (RingAttention / sequence-parallel SSD), for long prompts; decoding runs as usual.
    """
    request = _validate(params, config, prompts, gen_config, on_token)
    check_sequence_parallel(config, sequence_parallel, cache_is_empty=True)
    if sequence_parallel is not None and gen_config.kv_compression is not None:
        raise ValueError("sequence_parallel does not combine with kv_compression yet (its prefill observes queries)")
    if sequence_parallel is not None and gen_config.sparse_prefill is not None:
        raise ValueError("sequence_parallel and sparse_prefill are two ways to run a long prefill: pick one")
    plan = _plan(params, config, gen_config, request)
    start = time.perf_counter()
    logits, cache = _prefill_request(params, config, gen_config, request, plan, impl, sequence_parallel)
    prefill_seconds = time.perf_counter() - start
    beams, stats, evaluations = None, None, None
    if gen_config.num_beams > 1:
        beams = _beam_request(params, config, gen_config, request, cache, logits, impl)
        tokens, reasons = [seqs[0] for seqs in beams.sequences], [why[0] for why in beams.finish_reasons]
    else:
        out, stats, stopped, evaluations = _decode_request(
            params, config, gen_config, request, plan, cache, logits, on_token, impl
        )
        tokens, reasons = split_at_eos(out, set(request.eos))
        reasons = ["constraint" if end else why for why, end in zip(reasons, stopped, strict=True)]
    decode_seconds = time.perf_counter() - start - prefill_seconds
    return GenerationResult(tokens, reasons, prefill_seconds, decode_seconds, stats, beams, evaluations)


def _validate(params, config, prompts, gen_config, on_token) -> _Request:
    """Check the arguments, the prompts and the options against the model (not yet the memory)."""
    if not isinstance(gen_config, GenerationConfig):
        raise TypeError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
    family_module(config)  # a TypeError naming what config should be
    check_params(params, config)
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be callable(step, tokens), got {on_token!r}")
    prompts = check_prompts(prompts, config.vocab_size)
    lengths = [len(p) for p in prompts]
    eos = as_token_ids(
        "eos_token_ids",
        gen_config.eos_token_ids if gen_config.eos_token_ids is not None else config.eos_token_ids,
        config.vocab_size,
    )
    check_options(config, gen_config, max(lengths), on_token)
    if gen_config.kv_compression is not None:  # the policy's own limits first: clearer than a memory estimate
        gen_config.kv_compression.check(config, tuple(sorted(set(lengths))))
    return _Request(prompts, eos)


def check_options(config, gen_config: GenerationConfig, longest: int, on_token) -> None:
    """The options that depend on the model: context, KV compression, speculative decoding."""
    needed = longest + gen_config.max_new_tokens
    if gen_config.max_len is not None and needed > gen_config.max_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({gen_config.max_new_tokens}) "
            f"= {needed} exceeds max_len {gen_config.max_len}"
        )
    policy, drafter = gen_config.kv_compression, gen_config.speculative
    if policy is not None and not isinstance(config, ModelConfig):
        raise ValueError(f"kv_compression compresses attention caches; {type(config).__name__} models have none")
    if gen_config.sparse_prefill is not None:
        if not isinstance(config, ModelConfig):
            raise ValueError(f"sparse_prefill sparsifies attention; {type(config).__name__} models have none")
        gen_config.sparse_prefill.check(config)
    context = config.max_position_embeddings  # None: no limit (state-space models)
    if context is not None and longest > context:
        raise ValueError(f"the longest prompt ({longest} tokens) exceeds the model's context of {context} positions")
    if context is not None and needed > context and not (policy is not None and policy.unbounded):
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({gen_config.max_new_tokens}) "
            f"= {needed} exceeds the model's context of {context} positions "
            f"(kv_compression=StreamingLLM(...) can generate past it)"
        )
    if drafter is not None and getattr(config, "family", None) == "quamba":
        raise ValueError(
            "speculative decoding does not support quantized (Quamba) targets yet: its per-node "
            "SSM states are float; generate without speculative="
        )
    if gen_config.num_beams > 1 and on_token is not None:
        raise ValueError(
            "on_token streaming is not supported with beam search (beams are reordered); pass on_token=None"
        )
    if drafter is not None and on_token is not None:
        raise ValueError(
            "on_token streaming is not supported with speculative decoding (a round emits several "
            "tokens per row); pass on_token=None"
        )


def _plan(params, config, gen_config: GenerationConfig, request: _Request) -> LengthPlan:
    """This request's sizes (`plan_lengths`), refused with a MemoryError when its buffers cannot fit."""
    drafter = gen_config.speculative
    plan = plan_lengths(
        max(request.lengths),
        gen_config.max_new_tokens,
        max_len=gen_config.max_len,
        context=config.max_position_embeddings,
        state_space=not isinstance(config, ModelConfig),
        compressed=gen_config.kv_compression is not None,
        tree_size=None if drafter is None else drafter.tree_size,
    )
    beams = gen_config.beam_search
    buffers = 1 if beams is None else beams.token_buffers(len(request.eos))
    batch = len(request.prompts) * gen_config.num_beams
    _check_memory(config, gen_config, batch, plan, activation_dtype(params), buffers)
    return plan


def _check_memory(
    config, gen_config: GenerationConfig, batch: int, plan: LengthPlan, dtype, token_buffers: int = 1
) -> None:
    """Refuse a request whose cache, output buffer or draft trees cannot fit in free memory, naming the
    option that sized them. Estimates (upper bounds for compressed caches: the dense prefill cache plus
    `capacity` dense slots; quantized storage is smaller). `batch` counts every beam of a beam search, and
    `token_buffers` its [batch, max_new_tokens] token buffers."""
    policy, drafter = gen_config.kv_compression, gen_config.speculative
    max_len = plan.max_len
    out_bytes = 4 * batch * gen_config.max_new_tokens * token_buffers
    if isinstance(config, ModelConfig) and policy is not None:
        what = f"kv_compression={describe_policy(policy)}"
        cache_bytes = memory_bound(config, policy, batch, plan.prompt_len, max_len, dtype)
    elif isinstance(config, ModelConfig):
        what = f"a KV cache of {max_len} positions for {batch} prompts (longest prompt + max_new_tokens" + (
            f" + a draft tree of {drafter.tree_size} nodes)" if drafter is not None else ")"
        )
        cache_bytes = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * dtype.itemsize * max_len
    else:
        cache = jax.eval_shape(lambda: init_cache(config, batch, 1, dtype))
        cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
        what = f"the state-space cache of {batch} prompts"
        if drafter is not None:  # one recurrent state per tree node
            cache_bytes *= 1 + drafter.tree_size
            what = f"speculative={type(drafter).__name__} (one state per node of a {drafter.tree_size}-node tree)"
    if gen_config.num_beams > 1:  # the prompts' cache, and the beams' before and after each step's reordering
        cache_bytes = 2 * cache_bytes + cache_bytes // gen_config.num_beams
        what = f"num_beams={gen_config.num_beams}: {what}, twice, for every beam"
    check_fits(f"max_new_tokens={gen_config.max_new_tokens} (the output buffer)", out_bytes)
    check_fits(what, cache_bytes + out_bytes)


def _prefill_request(
    params, config, gen_config: GenerationConfig, request: _Request, plan: LengthPlan, impl, sequence_parallel=None
):
    """The prompts' prefill, dense or compressed by the config's policy, finished (not only dispatched):
    (logits [B, V] at each prompt's last token, the cache)."""
    policy, sparse = gen_config.kv_compression, gen_config.sparse_prefill
    tokens, lengths = request.padded(plan.prompt_len), request.lengths
    if policy is None:
        logits, cache = _prefill(
            params,
            config,
            jnp.asarray(tokens),
            jnp.asarray(lengths, jnp.int32),
            plan.cache_len,
            impl,
            activation_dtype(params),
            sequence_parallel,
            sparse,
        )
    else:
        logits, cache = kv_prefill(
            params, config, tokens, policy, plan.max_len, token_counts=lengths, impl=impl, sparse_prefill=sparse
        )
    logits.block_until_ready()
    return logits, cache


def _decode_request(
    params, config, gen_config: GenerationConfig, request: _Request, plan: LengthPlan, cache, logits, on_token, impl
) -> tuple[np.ndarray, SpeculativeStats | None, np.ndarray, int | None]:
    """The decode loop after the prefill, plain, constrained or speculative: (tokens [B, max_new_tokens], -1
    after a row's end; the speculative statistics or None; [B] rows ended by their constraint's grammar; the
    constraint's evaluations or None)."""
    key = jax.random.PRNGKey(gen_config.seed)
    sampling = Sampling.create(
        vocab_size=config.vocab_size,
        temperature=gen_config.temperature,
        top_k=gen_config.top_k,
        top_p=gen_config.top_p,
        min_p=gen_config.min_p,
    )
    stop = dict(max_new_tokens=gen_config.max_new_tokens, eos=request.eos)
    # The compiled loops take the count as a traced value and fill a bucketed width (cut here).
    count, loop_stop = gen_config.max_new_tokens, dict(width=output_width(gen_config.max_new_tokens), eos=request.eos)
    drafter, constraint = gen_config.speculative, gen_config.constraint
    none = np.zeros(len(request.prompts), bool)
    if constraint is not None and drafter is not None:
        return _decode_constrained_speculative(
            params, config, gen_config, request, plan, cache, logits, key, sampling, impl
        )
    if constraint is not None:
        matchers = Matchers(constraint, len(request.prompts), config.vocab_size, request.eos)
        loop = _decode_awrs if gen_config.constrained_sampling == "awrs" else _decode_streamed
        out, stopped = loop(
            params, config, cache, logits, key, sampling, on_token, **stop, impl=impl, matchers=matchers
        )
        return out, None, stopped, matchers.evaluations
    if drafter is None and on_token is not None:
        out, stopped = _decode_streamed(params, config, cache, logits, key, sampling, on_token, **stop, impl=impl)
        return out, None, stopped, None
    if drafter is None:
        out, _ = _decode(params, config, cache, logits, key, sampling, jnp.int32(count), **loop_stop, impl=impl)
        return np.asarray(out)[:, :count], None, none, None
    state, history, counts = _drafter_start(params, config, drafter, request, plan, impl)
    out, _, rounds, accepted, state = speculative_decode(
        params,
        config,
        drafter,
        state,
        cache,
        logits,
        history,
        counts,
        key,
        sampling,
        jnp.int32(count),
        **loop_stop,
        impl=impl,
    )
    stats = SpeculativeStats(np.asarray(rounds).tolist(), np.asarray(accepted).tolist(), state)
    return np.asarray(out)[:, :count], stats, none, None


def _drafter_start(params, config, drafter, request: _Request, plan: LengthPlan, impl):
    """The drafter's first state and the committed-tokens buffer [B, max_len] the speculative loop starts from."""
    # The capacity is a bucketed size (not the exact need) so that nearby prompt lengths, or a fixed
    # max_len, share one compiled loop; each row's draft tree is scored in the max_len - capacity slots after it.
    prompts, counts = jnp.asarray(request.padded(plan.prompt_len)), jnp.asarray(request.lengths, jnp.int32)
    state = drafter.init(params, config, prompts, counts, plan.capacity, impl)
    return state, jnp.asarray(request.padded(plan.max_len)), counts


def _decode_constrained_speculative(
    params, config, gen_config, request: _Request, plan, cache, logits, key, sampling, impl
):
    """`_decode_request` with both a constraint and a drafter (greedy): see `constrained_speculation`."""
    drafter = gen_config.speculative
    matchers = Matchers(gen_config.constraint, len(request.prompts), config.vocab_size, request.eos)
    state, history, counts = _drafter_start(params, config, drafter, request, plan, impl)
    out, rounds, accepted, state, stopped = constrained_speculation.decode(
        params,
        config,
        drafter,
        state,
        cache,
        logits,
        history,
        counts,
        key,
        sampling,
        matchers,
        max_new_tokens=gen_config.max_new_tokens,
        eos=request.eos,
        impl=impl,
    )
    stats = SpeculativeStats(rounds.tolist(), accepted.tolist(), state)
    return out, stats, stopped, matchers.evaluations


def _beam_request(
    params, config, gen_config: GenerationConfig, request: _Request, cache, logits, impl
) -> BeamHypotheses:
    """Beam search after the prefill: every prompt's finished hypotheses, best first."""
    hypotheses, scores = beam_search(
        params,
        config,
        cache,
        logits,
        gen_config.beam_search,
        max_new_tokens=gen_config.max_new_tokens,
        eos=request.eos,
        impl=impl,
    )
    split = [split_at_eos(rows, set(request.eos)) for rows in np.asarray(hypotheses)]
    return BeamHypotheses([s for s, _ in split], np.asarray(scores).tolist(), [r for _, r in split])


def split_at_eos(out: np.ndarray, eos_set: set) -> tuple[list[list[int]], list[str]]:
    """Each row's tokens up to (excluding) its first EOS or -1 padding, and why it stopped."""
    new_tokens, reasons = [], []
    for row in out:
        seq, reason = [], "length"
        for t in row.tolist():
            if t < 0:
                break
            if t in eos_set:
                reason = "eos"
                break
            seq.append(t)
        new_tokens.append(seq)
        reasons.append(reason)
    return new_tokens, reasons
