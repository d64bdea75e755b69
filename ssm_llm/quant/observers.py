"""Calibration observers: activation statistics folded over batches, turned into static scales.

An observer is a small frozen pytree; `update(stats, x) -> stats` is pure (jit-, vmap- and scan-able),
so statistics fold over calibration batches (`functools.reduce(update, batches, stats)`), or over
stacked layers with `jax.vmap(update)`. `scale(stats, bits)` is the offline last step (not jittable:
it checks that data was seen and reads the histogram on the host).

Statistics are kept per element of a trailing `shape` of x: () is per tensor, (C,) per channel of the
last axis, (H, P) per head and channel; every leading axis is reduced, so batch and sequence sizes may
change between batches, and the resulting scale [*shape] broadcasts against x as it is. To keep another
axis (a group axis, say), move it to the end first.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.quant.quantizers import qrange, scale_from_absmax

# The percentile histogram's octaves: |x| in [2^E_MIN, 2^E_MAX) is binned on a log-linear grid; smaller
# values share bin 0 (estimated as at most 2^E_MIN), larger ones the last bin (estimated by the absmax).
E_MIN, E_MAX = -64, 64


def _check_shape(shape, where: str) -> tuple[int, ...]:
    shape = tuple(shape)
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"{where}: shape must be a tuple of positive ints, got {shape!r}")
    return tuple(int(d) for d in shape)


def _leading_abs(x, shape: tuple[int, ...], where: str):
    """|x| as float32 [M, prod(shape)]: x's trailing dims must equal `shape`."""
    x = jnp.asarray(x)
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
        raise ValueError(f"{where}: x of shape {tuple(x.shape)} must end with the observer's shape {shape}")
    return jnp.abs(x.astype(jnp.float32)).reshape(-1, math.prod(shape))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["absmax"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class MinMaxObserver:
    """Running max |x| per element of the trailing shape. absmax: float32 [*shape], -inf until seen."""

    absmax: jax.Array

    @classmethod
    def create(cls, shape: tuple[int, ...] = ()) -> MinMaxObserver:
        return cls(jnp.full(_check_shape(shape, "MinMaxObserver"), -jnp.inf, jnp.float32))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["counts", "absmax"], meta_fields=["alpha", "bins_per_octave"]
)
@dataclasses.dataclass(frozen=True)
class PercentileObserver:
    """The alpha-quantile of |x| per element of the trailing shape, from a histogram of every value seen.

    counts: int32 [*shape, 1 + (E_MAX - E_MIN) * bins_per_octave]; absmax: float32 [*shape].
    Bin 0 holds |x| < 2^E_MIN; each octave [2^e, 2^(e+1)) above it is split into `bins_per_octave`
    equal bins, so a bin's width is at most 1 / bins_per_octave of its lower edge. The bin of a value
    comes from its exact float32 exponent and mantissa bits (frexp), so binning is exact, and the
    histogram is the same whatever the batching.

    Bound: with v the exact alpha-quantile of everything observed, numpy's
    `np.quantile(|x|, alpha, method="higher")` (the observed value at sorted index ceil(alpha (n - 1))),
    the estimate is min(upper edge of v's bin, absmax), so
        v <= estimate <= v * (1 + 1 / bins_per_octave)     for 2^E_MIN <= v < 2^E_MAX,
    estimate <= 2^E_MIN below that range, and estimate = absmax above it (and at alpha = 1).
    numpy's default (linear) quantile lies between the "lower" and "higher" ones, so it is <= estimate.

    Memory: 4 bytes per bin per element of shape (128 KiB per tensor at the default 256 bins per octave).
    Counts are int32: at most 2^31 - 1 observed values may fall in one bin of one element.
    x must be finite.
    """

    counts: jax.Array
    absmax: jax.Array
    alpha: float
    bins_per_octave: int

    @classmethod
    def create(cls, alpha: float, shape: tuple[int, ...] = (), bins_per_octave: int = 256) -> PercentileObserver:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 < alpha <= 1:
            raise ValueError(f"PercentileObserver: alpha must be a number in (0, 1], got {alpha!r}")
        if (
            isinstance(bins_per_octave, bool)
            or not isinstance(bins_per_octave, int)
            or bins_per_octave < 1
            or bins_per_octave & (bins_per_octave - 1)
        ):
            raise ValueError(
                f"PercentileObserver: bins_per_octave must be a power of two >= 1, got {bins_per_octave!r}"
            )
        shape = _check_shape(shape, "PercentileObserver")
        bins = 1 + (E_MAX - E_MIN) * bins_per_octave
        return cls(
            jnp.zeros((*shape, bins), jnp.int32), jnp.full(shape, -jnp.inf, jnp.float32), float(alpha), bins_per_octave
        )


def _bin_index(a, bins_per_octave: int):
    """a: float32 >= 0 -> int32 histogram bin (see PercentileObserver)."""
    m, e = jnp.frexp(a)  # a = m * 2^e with m in [0.5, 1): octave e - 1, position 2m - 1 in [0, 1) within it
    # (2m - 1) * bins_per_octave is exact: a power-of-two multiple of a float in [0, 1).
    sub = jnp.floor((2 * m - 1) * bins_per_octave).astype(jnp.int32)
    idx = 1 + (e - 1 - E_MIN) * bins_per_octave + sub
    last = (E_MAX - E_MIN) * bins_per_octave
    return jnp.where(a < 2.0**E_MIN, 0, jnp.clip(idx, 1, last))


def _upper_edges(bins_per_octave: int) -> np.ndarray:
    """float64 [bins]: each bin's upper edge; the last bin's is +inf (it holds everything >= 2^E_MAX)."""
    octave = np.arange(E_MAX - E_MIN)[:, None]
    sub = np.arange(1, bins_per_octave + 1)[None, :]
    edges = (2.0 ** (E_MIN + octave) * (1 + sub / bins_per_octave)).reshape(-1)
    return np.concatenate([[2.0**E_MIN], edges[:-1], [np.inf]])


def update(stats, x):
    """Fold one batch x [..., *shape] into an observer; returns the new observer (pure)."""
    if not isinstance(stats, (MinMaxObserver, PercentileObserver)):
        raise TypeError(f"update: expected a MinMaxObserver or PercentileObserver, got {type(stats).__name__}")
    shape = stats.absmax.shape
    a = _leading_abs(x, shape, "update")  # [M, C]
    absmax = jnp.maximum(stats.absmax, jnp.max(a, axis=0, initial=-jnp.inf).reshape(shape))
    if isinstance(stats, MinMaxObserver):
        return MinMaxObserver(absmax)
    channels = jnp.broadcast_to(jnp.arange(a.shape[1]), a.shape)
    flat = stats.counts.reshape(a.shape[1], -1)
    counts = flat.at[channels, _bin_index(a, stats.bins_per_octave)].add(1).reshape(stats.counts.shape)
    return dataclasses.replace(stats, counts=counts, absmax=absmax)


def clip_value(stats) -> np.ndarray:
    """The observed magnitude a scale must cover, float32 [*shape]: the absmax (MinMaxObserver) or the
    alpha-quantile estimate of |x| (PercentileObserver, see its bound). ValueError if nothing was seen."""
    if not isinstance(stats, (MinMaxObserver, PercentileObserver)):
        raise TypeError(f"clip_value: expected a MinMaxObserver or PercentileObserver, got {type(stats).__name__}")
    absmax = np.asarray(stats.absmax)
    if np.any(absmax == -np.inf):  # every update covers all elements, so it is all or none
        raise ValueError(
            "no calibration data: the observer has not seen any value (update it with a batch "
            "of at least one element first)"
        )
    if isinstance(stats, MinMaxObserver):
        return absmax
    cumulative = np.cumsum(np.asarray(stats.counts, np.int64), axis=-1)
    total = cumulative[..., -1]
    rank = np.ceil(stats.alpha * (total - 1)).astype(np.int64)  # 0-based sorted index of the quantile
    bin_of_rank = np.sum(cumulative <= rank[..., None], axis=-1)
    return np.minimum(_upper_edges(stats.bins_per_octave)[bin_of_rank], absmax).astype(np.float32)


def scale(stats, bits: int) -> jax.Array:
    """The static symmetric scale float32 [*shape] = clip_value(stats) / q_max (0 where only 0 was seen)."""
    qrange(bits)  # bad bits fail before the histogram is read
    return scale_from_absmax(clip_value(stats), bits)
