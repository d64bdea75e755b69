"""Token sampling as a pure function of logits and a PRNG key.

Filters follow Hugging Face's warpers, in its order: temperature, top-k, top-p (nucleus), min-p.
Each later filter sees the distribution left by the earlier ones. `Sampling` holds one request's
rule as a pytree that the compiled decode loops, the acceptance of draft trees and the drafters share.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
# top-p first looks for the nucleus among this many best tokens and sorts the whole vocabulary only
# for rows whose nucleus is larger (flat distributions); the result is exact either way.
_TOP_P_CANDIDATES = 256


def is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    """Which of `tokens` (int, any shape) is one of the `eos` ids (a static tuple; empty: none)."""
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return (tokens[..., None] == jnp.asarray(eos, jnp.int32)).any(-1)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` as int32 (the first index of the largest value; a NaN counts as the largest,
    the first NaN then), computed as a max and then the first index holding it: two plain reductions where XLA's
    CPU argmax is one variadic reduce (on the 2-core VNNI EPYC over 49152 logits: 0.51 vs 1.96 ms at 16 rows, 0.09
    vs 0.24 ms at one; experiments/greedy_tokens_speed.py).

    XLA may compute the logits' elementwise producer once per reduction and round the two copies differently (a
    multiply-add contracted in one copy only: seen on the CPU with its older fusion emitters, for a first version of
    the two-term int8 head); where no element then holds the max, the rows take `jnp.argmax` (one reduce, one
    copy), inside a `cond` so that it costs nothing otherwise (under `vmap` both run)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    first = jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)
    return jax.lax.cond(
        jnp.all(first < logits.shape[-1]), lambda: first, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    )


def _top_k_filter(logits, k: int):
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def _nucleus_threshold(sorted_logits, log_z, top_p):
    """Smallest kept logit per row, from logits sorted descending `[B, K]` (K may be a prefix of the
    vocabulary) and the full log-normaliser `log_z: [B, 1]`; also whether all K were kept."""
    probs = jnp.exp(sorted_logits - log_z)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    keep = (mass_before < top_p).at[..., 0].set(True)
    last = jnp.sum(keep, axis=-1, keepdims=True) - 1
    return jnp.take_along_axis(sorted_logits, last, axis=-1), jnp.all(keep, axis=-1)


def _top_p_filter(logits, top_p):
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    best = jax.lax.top_k(logits, min(_TOP_P_CANDIDATES, vocab))[0]
    threshold, saturated = _nucleus_threshold(best, log_z, top_p)
    if best.shape[-1] < vocab:
        threshold = jax.lax.cond(
            jnp.any(saturated),
            lambda: _nucleus_threshold(-jnp.sort(-logits, axis=-1), log_z, top_p)[0],
            lambda: threshold,
        )
    return jnp.where(logits < threshold, NEG_INF, logits)


def _min_p_filter(logits, min_p):
    probs = jax.nn.softmax(logits, axis=-1)
    floor = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < floor, NEG_INF, logits)


def filter_logits(logits: jax.Array, *, temperature=1.0, top_k: int | None = None, top_p=None, min_p=None) -> jax.Array:
    """Scale by temperature and set excluded tokens to -inf. logits: [B, V] -> [B, V] float32.

    `top_k` is static (0 or None disables it); `top_p` / `min_p` may be traced scalars, or None to
    skip the filter. At least the most likely token always survives.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        logits = _top_k_filter(logits, min(int(top_k), logits.shape[-1]))
    if top_p is not None:
        logits = _top_p_filter(logits, top_p)
    if min_p is not None:
        logits = _min_p_filter(logits, min_p)
    return logits


def sample(
    logits: jax.Array, key: jax.Array, *, temperature=0.0, top_k: int | None = None, top_p=None, min_p=None
) -> jax.Array:
    """Draw one token per row of `logits: [B, V]`; temperature 0 (a Python number) is greedy argmax.

    Returns int32 `[B]`.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy_tokens(logits)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class Sampling:
    """How tokens are drawn, as one pytree passed through `jax.jit`: the numbers are traced (one compiled
    loop serves every temperature, top-p and min-p) and which rules apply is static.

    Traced float32 scalars: temperature (unused when greedy; `create` stores 1.0 then), top_p, min_p.
    Static: greedy (argmax), top_k (None: off, else 1..V-1), use_top_p, use_min_p (whether those filters
    run). Build it from the user's numbers with `Sampling.create`. Drafters read `temperature` and `greedy`:
    sampled drafters draw their children at this temperature from their own distribution, unfiltered
    (any draft law is exact, as long as the tree records it in `child_probs`).
    """

    temperature: jax.Array
    top_p: jax.Array = 1.0
    min_p: jax.Array = 0.0
    greedy: bool = flax.struct.field(pytree_node=False, default=True)
    top_k: int | None = flax.struct.field(pytree_node=False, default=None)
    use_top_p: bool = flax.struct.field(pytree_node=False, default=False)
    use_min_p: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls,
        *,
        vocab_size: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        min_p: float = 0.0,
    ) -> Sampling:
        """From `GenerationConfig`'s numbers: temperature 0 is greedy; a top_k of 0, None or at least
        `vocab_size` keeps every token, so it is off; top_p 1.0 and min_p 0.0 are off."""
        return cls(
            temperature=jnp.float32(temperature or 1.0),
            top_p=jnp.float32(top_p),
            min_p=jnp.float32(min_p),
            greedy=temperature == 0,
            top_k=top_k if top_k and top_k < vocab_size else None,
            use_top_p=top_p < 1.0,
            use_min_p=min_p > 0,
        )

    def filter(self, logits: jax.Array) -> jax.Array:
        """`filter_logits` with this rule's temperature and filters: [B, V] -> [B, V] float32."""
        return filter_logits(logits, temperature=self.temperature, top_k=self.top_k, **self._thresholds())

    def draw(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """One token per row of `logits: [B, V]` (argmax when greedy): int32 [B]."""
        return sample(
            logits, key, temperature=0.0 if self.greedy else self.temperature, top_k=self.top_k, **self._thresholds()
        )

    def probs(self, logits: jax.Array) -> jax.Array:
        """The sampled distribution, softmax of `filter`: logits [..., V] -> [..., V] float32.
        A greedy rule has none (ValueError): greedy acceptance compares argmaxes."""
        if self.greedy:
            raise ValueError(
                "temperature must be positive for a sampled distribution; greedy sampling (temperature 0) has none"
            )
        filtered = self.filter(logits.reshape(-1, logits.shape[-1]))
        return jax.nn.softmax(filtered, axis=-1).reshape(logits.shape)

    def _thresholds(self) -> dict:
        return dict(top_p=self.top_p if self.use_top_p else None, min_p=self.min_p if self.use_min_p else None)
