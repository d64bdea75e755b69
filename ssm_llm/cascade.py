"""Token-level language model cascades (Gupta et al., 2024, "Language Model Cascades: Token-level uncertainty
and beyond"): a small model writes, and each token whose uncertainty under the small model reaches a threshold
is written by the large model instead.

Greedy. Both models keep their own caches. The large model is lazy: it reads nothing until a token is
deferred, then reads, in one forward, every token written since its last call, and gives the deferred token
(its argmax). It runs once per step at which some row defers (in a batch, any row), not once per token.

Uncertainty (the paper's token-level scores; the lower, the more confident):
  "chow":    1 - max softmax probability (Chow's rule);
  "entropy": the entropy of the small model's next-token distribution, in nats;
  "margin":  1 - (top-1 probability - top-2 probability).
A threshold of 0 defers every token (the large model's greedy output); one above the score's range none
(the small model's).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.generation import MAX_NEW_TOKENS, check_prompts, split_at_eos
from ssm_llm.model import forward, init_cache
from ssm_llm.sampling import greedy_tokens
from ssm_llm.validation import as_float, as_int, as_token_ids

UNCERTAINTIES = ("chow", "entropy", "margin")


@dataclasses.dataclass(frozen=True)
class TokenCascade:
    """Defer a token to the large model when the small model's `uncertainty` ("chow", "entropy" or "margin") is
    at least `threshold` (>= 0)."""

    threshold: float
    uncertainty: str = "chow"

    def __post_init__(self):
        object.__setattr__(self, "threshold", as_float("threshold", self.threshold, 0.0))
        if self.uncertainty not in UNCERTAINTIES:
            raise ValueError(f"uncertainty must be one of {list(UNCERTAINTIES)}, got {self.uncertainty!r}")


@dataclasses.dataclass(frozen=True)
class CascadeResult:
    """tokens[i]: prompt i's new tokens (EOS excluded); deferred[i][j]: whether tokens[i][j] (and, for a row
    ended by EOS, deferred[i][-1] its EOS) came from the large model; finish_reasons[i]: "eos" or "length";
    large_forwards: the large model's calls after its prefill; seconds: wall time of the whole call."""

    tokens: list[list[int]]
    deferred: list[list[bool]]
    finish_reasons: list[str]
    large_forwards: int
    seconds: float

    @property
    def deferral_rate(self) -> float:
        """Deferred tokens / written tokens (EOS included), over the batch."""
        written = sum(len(d) for d in self.deferred)
        return sum(sum(d) for d in self.deferred) / written if written else 0.0


def uncertainty(logits: jax.Array, how: str) -> jax.Array:
    """[B, V] logits -> [B] float32: the token-level uncertainty `how` (see the module docstring)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if how not in UNCERTAINTIES:
        raise ValueError(f"uncertainty must be one of {list(UNCERTAINTIES)}, got {how!r}")
    if how == "chow":
        return 1.0 - jnp.exp(logp.max(-1))
    if how == "entropy":
        return -(jnp.exp(logp) * jnp.where(jnp.isfinite(logp), logp, 0.0)).sum(-1)
    top2 = jnp.exp(jax.lax.top_k(logp, 2)[0])
    return 1.0 - (top2[:, 0] - top2[:, 1])


@functools.partial(jax.jit, static_argnames=("config", "how"), donate_argnames=("cache",))
def _read(params, config, cache, tokens, counts, how: str):
    """Append right-padded `tokens` [B, T] (`counts` real ones per row) to `cache`: (argmax [B], uncertainty [B]
    at each row's last real token, the cache)."""
    logits, cache = forward(params, config, tokens, cache, token_counts=counts)
    last = jnp.take_along_axis(logits, (counts - 1)[:, None, None], axis=1)[:, 0]
    return greedy_tokens(last), uncertainty(last, how), cache


def _bucket(n: int) -> int:
    """The padded width for `n` tokens: a power of two (few compiled shapes)."""
    return 1 << max(0, (n - 1).bit_length())


def _padded(rows: list[list[int]], width: int) -> jax.Array:
    out = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return jnp.asarray(out)


def generate(
    small: tuple[dict, object],
    large: tuple[dict, object],
    prompts: Sequence[Sequence[int]],
    cascade: TokenCascade,
    *,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] | None = None,
) -> CascadeResult:
    """Greedy generation by the token-level cascade of `small` and `large` ((params, config) pairs over one
    vocabulary) for a ragged batch of token-id `prompts`. `eos_token_ids` default: the large model's."""
    (small_params, small_config), (large_params, large_config) = small, large
    if small_config.vocab_size != large_config.vocab_size:
        raise ValueError(
            f"a cascade's models must share a vocabulary: the small model has {small_config.vocab_size} tokens, "
            f"the large one {large_config.vocab_size}"
        )
    if not isinstance(cascade, TokenCascade):
        raise TypeError(f"cascade must be a TokenCascade, got {type(cascade).__name__}")
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    prompts = check_prompts(prompts, small_config.vocab_size)
    eos = large_config.eos_token_ids if eos_token_ids is None else eos_token_ids
    eos = set(as_token_ids("eos_token_ids", eos, large_config.vocab_size))
    width = _bucket(max(map(len, prompts)))
    # Room for the prompts' padded read, and for the last catch-up's padding past max_new_tokens.
    max_len = max(width, max(map(len, prompts)) + max_new_tokens + _bucket(max_new_tokens))
    for config in (small_config, large_config):
        context = getattr(config, "max_position_embeddings", None)
        if context is not None and max(map(len, prompts)) + max_new_tokens > context:
            raise ValueError(
                f"the longest prompt ({max(map(len, prompts))} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"a model's context of {context} positions"
            )
    start = time.perf_counter()
    batch, how = len(prompts), cascade.uncertainty
    counts = jnp.asarray([len(p) for p in prompts], jnp.int32)
    small_cache = init_cache(small_config, batch, max_len)
    large_cache = init_cache(large_config, batch, max_len)
    small_tok, small_u, small_cache = _read(
        small_params, small_config, small_cache, _padded(prompts, width), counts, how
    )
    large_tok, _, large_cache = _read(large_params, large_config, large_cache, _padded(prompts, width), counts, how)
    large_fresh = True  # the large model's argmax is current (nothing written since its last read)
    pending: list[list[int]] = [[] for _ in range(batch)]  # tokens written since the large model last read
    out = np.full((batch, max_new_tokens), -1, np.int32)
    deferred = np.zeros((batch, max_new_tokens), bool)
    done = np.zeros(batch, bool)
    large_forwards = 0
    for step in range(max_new_tokens):
        choice, defer = np.asarray(small_tok), np.asarray(small_u) >= cascade.threshold
        defer &= ~done
        if defer.any():
            if not large_fresh:
                tokens = _padded(pending, _bucket(len(pending[0])))
                n = jnp.full((batch,), len(pending[0]), jnp.int32)
                large_tok, _, large_cache = _read(large_params, large_config, large_cache, tokens, n, how)
                large_forwards += 1
                pending = [[] for _ in range(batch)]
            choice = np.where(defer, np.asarray(large_tok), choice)
        new = np.where(done, -1, choice).astype(np.int32)
        out[:, step], deferred[:, step] = new, defer
        done |= np.isin(new, list(eos))
        if done.all() or step == max_new_tokens - 1:
            break
        fed = np.where(new >= 0, new, 0)  # finished rows feed a placeholder; their outputs are ignored
        for row, token in enumerate(fed.tolist()):
            pending[row].append(token)
        large_fresh = False
        one = jnp.ones((batch,), jnp.int32)
        small_tok, small_u, small_cache = _read(
            small_params, small_config, small_cache, jnp.asarray(fed)[:, None], one, how
        )
    tokens, reasons = split_at_eos(out, eos)
    written = [len(seq) + (why == "eos") for seq, why in zip(tokens, reasons, strict=True)]  # the EOS too
    flags = [deferred[row, :n].tolist() for row, n in enumerate(written)]
    return CascadeResult(tokens, flags, reasons, large_forwards, time.perf_counter() - start)
