"""Quantizers and observers (ssm_llm.quant): fake-quant stays within half a step inside the range and
clips beyond it, per tensor / channel / group, on hypothesis-drawn shapes; codes agree with
`quantize_weights`; observers folded over batches equal numpy's absmax and (within the stated bound)
numpy's quantile; and clear errors for bad bits, alpha, shapes and empty observers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.quantized_matmul import quantize_weights, unpack_int4
from ssm_llm.quant import (
    MinMaxObserver,
    PercentileObserver,
    absmax_scale,
    clip_value,
    dequantize,
    fake_quant,
    merge_groups,
    qrange,
    quantize,
    scale,
    split_groups,
    update,
)
from ssm_llm.quant.observers import E_MIN

BITS = st.sampled_from([4, 8])
# Jitted: one compile per drawn shape instead of one per eager op.
fake_quant_jit = jax.jit(fake_quant, static_argnums=2)
quantize_jit = jax.jit(quantize, static_argnums=2)
SHAPES = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


def _assert_half_step_or_clipped(x, scale_, bits):
    """Inside [q_min s, q_max s]: |x - fq| <= s / 2; beyond: fq is the nearest end of the range."""
    q_min, q_max = qrange(bits)
    x = np.asarray(x, np.float32)
    s = np.broadcast_to(np.asarray(scale_, np.float32), x.shape)
    q = quantize_jit(x, scale_, bits)
    assert q.dtype == jnp.int8 and (np.asarray(q) >= q_min).all() and (np.asarray(q) <= q_max).all()
    fq = np.asarray(fake_quant_jit(x, scale_, bits))
    slack = 1e-6 * np.abs(x)  # float32 rounding of x / s and q * s
    inside = (x >= q_min * s) & (x <= q_max * s)
    assert (np.abs(x - fq)[inside] <= s[inside] / 2 + slack[inside]).all()
    np.testing.assert_allclose(fq[x > q_max * s], (q_max * s)[x > q_max * s], rtol=1e-6)
    np.testing.assert_allclose(fq[x < q_min * s], (q_min * s)[x < q_min * s], rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    bits=BITS,
    shape=SHAPES,
    kind=st.sampled_from(["tensor", "channel", "group"]),
    seed=st.integers(0, 2**16),
    shrink=st.floats(0.3, 1.0),
)
def test_fake_quant_within_half_a_step_inside_the_range_and_clipped_beyond(bits, shape, kind, seed, shrink):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*shape, 4)) * rng.lognormal(0, 1, 4)).astype(np.float32)  # channels of varied size
    # shrink < 1: scales cover only part of the data, so some values clip.
    if kind == "tensor":
        s = absmax_scale(x, bits) * shrink
        _assert_half_step_or_clipped(x, s, bits)
    elif kind == "channel":
        s = absmax_scale(x, bits, axis=tuple(range(x.ndim - 1))) * shrink
        assert s.shape == (4,)
        _assert_half_step_or_clipped(x, s, bits)
    else:
        groups = split_groups(x, 2, axis=-1)  # [..., 2, 2]
        s = absmax_scale(groups, bits, axis=-1, keepdims=True) * shrink
        assert s.shape == (*shape, 2, 1)
        _assert_half_step_or_clipped(groups, s, bits)
        assert merge_groups(fake_quant(groups, s, bits)).shape == x.shape


def test_qrange_and_codes_cover_the_kernel_ranges():
    assert qrange(8) == (-127, 127) and qrange(4) == (-8, 7)
    for bits in (4, 8):
        q_min, q_max = qrange(bits)
        q = quantize(jnp.array([-1e9, -3.0, 3.0, 1e9]), 1.0, bits)
        np.testing.assert_array_equal(q, [q_min, -3, 3, q_max])
        np.testing.assert_array_equal(dequantize(q, 0.5), [q_min / 2, -1.5, 1.5, q_max / 2])
    for bad in (1, 9, 16, 3.5, True, "8"):
        with pytest.raises(ValueError, match="bits must be an int in 2..8"):
            qrange(bad)
        with pytest.raises(ValueError, match="bits must be an int in 2..8"):
            fake_quant(jnp.ones(3), 1.0, bad)


def test_round_half_to_even_and_zero_scales_give_zero():
    np.testing.assert_array_equal(quantize(jnp.array([0.5, 1.5, 2.5, -0.5, -2.5]), 1.0, 8), [0, 2, 2, 0, -2])
    x = jnp.array([[1.0, -2.0], [0.0, 0.0]])
    s = jnp.array([[0.5], [0.0]])  # the second row's point only ever saw 0
    np.testing.assert_array_equal(quantize(x, s, 8), [[2, -4], [0, 0]])
    np.testing.assert_array_equal(fake_quant(x * 100.0, s, 8), [[63.5, -63.5], [0.0, 0.0]])  # clipped, zero


def test_dtypes_jit_and_scale_broadcast_errors():
    x = jnp.linspace(-2, 2, 12, dtype=jnp.bfloat16).reshape(3, 4)
    fq = fake_quant_jit(x, absmax_scale(x, 8), 8)
    assert fq.dtype == jnp.bfloat16 and fq.shape == x.shape
    with pytest.raises(ValueError, match=r"scale of shape \(3,\) must broadcast against x of shape \(3, 4\)"):
        quantize(x, jnp.ones(3), 8)
    with pytest.raises(ValueError, match="without enlarging"):
        fake_quant(x, jnp.ones((2, 3, 4)), 8)
    with pytest.raises(ValueError, match="group_size must be a positive int dividing"):
        split_groups(x, 3, axis=-1)


@settings(max_examples=8, deadline=None)
@given(
    bits=BITS,
    group=st.sampled_from([2, 8, 32]),
    groups=st.integers(1, 3),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_group_quantization_reproduces_quantize_weights(bits, group, groups, n, seed):
    """The same conventions as the kernel's weight quantizer: absmax / q_max per group, round, clip."""
    w = np.random.default_rng(seed).standard_normal((group * groups, n)).astype(np.float32)
    # Both eager, the same op on the same shapes: XLA may compile `/ q_max` as a multiplication by the
    # reciprocal (one ulp off) depending on fusion and vector lanes, so a jitted run could differ in the last bit.
    qw = quantize_weights(jnp.asarray(w), bits, group)
    grouped = split_groups(w, group, axis=0)  # [G, g, N]
    s = absmax_scale(grouped, bits, axis=1)
    np.testing.assert_array_equal(s, qw.scales)
    codes = merge_groups(quantize_jit(grouped, s[:, None, :], bits), axis=0)
    want = qw.values if bits == 8 else unpack_int4(qw.values)
    np.testing.assert_array_equal(codes, want)


# ---- observers ----


@settings(max_examples=15, deadline=None)
@given(
    shape=st.sampled_from([(), (3,), (2, 5)]),
    batches=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_minmax_observer_is_the_absmax_over_all_batches(shape, batches, seed):
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal((rows, 2, *shape)) * 10 ** rng.uniform(-3, 3)).astype(np.float32) for rows in batches]
    if sum(batches) == 0:
        xs.append(np.ones((1, *shape), np.float32))
    stats = functools.reduce(update, xs, MinMaxObserver.create(shape))
    everything = np.concatenate([x.reshape(-1, *shape) for x in xs])
    np.testing.assert_array_equal(clip_value(stats), np.abs(everything).max(axis=0))
    np.testing.assert_allclose(scale(stats, 8), np.abs(everything).max(axis=0) / 127, rtol=2.5e-7)  # 2 ulp


def _percentile_bound(values, alpha, bins_per_octave):
    """numpy's "higher" alpha-quantile v, and the documented upper bound v (1 + 1 / bins_per_octave)."""
    v = np.quantile(values, alpha, method="higher", axis=0)
    return v, np.maximum(v * (1 + 1 / bins_per_octave), 2.0**E_MIN)


@settings(max_examples=15, deadline=None)
@given(
    alpha=st.sampled_from([0.5, 0.9, 0.999, 0.9995, 1.0]),
    bins_per_octave=st.sampled_from([4, 64, 256]),
    n_batches=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_percentile_observer_matches_numpys_quantile_within_the_bound(alpha, bins_per_octave, n_batches, seed):
    rng = np.random.default_rng(seed)
    # Two batch shapes only: every new shape costs a compile of the histogram update.
    xs = [
        (rng.standard_normal((rng.choice([16, 128]), 8)) * rng.lognormal(0, 2)).astype(np.float32)
        for _ in range(n_batches)
    ]
    xs[0][0, :3] = [0.0, 1e4, -1e-25]  # an exact zero, an outlier, a value below the histogram's range
    stats = functools.reduce(update, xs, PercentileObserver.create(alpha, bins_per_octave=bins_per_octave))
    values = np.abs(np.concatenate(xs).reshape(-1))
    v, bound = _percentile_bound(values, alpha, bins_per_octave)
    est = clip_value(stats)
    assert v <= est <= bound
    assert np.quantile(values, alpha) <= est  # numpy's default (linear) quantile too
    if alpha == 1.0:
        assert est == values.max()


def test_percentile_observer_per_channel_jit_and_vmap():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 500, 3)).astype(np.float32) * np.array([1.0, 30.0, 1e-3], np.float32)
    step = jax.jit(update)
    stats = step(step(PercentileObserver.create(0.99, shape=(3,)), x[0]), x[1])
    v, bound = _percentile_bound(np.abs(x.reshape(-1, 3)), 0.99, 256)
    est = clip_value(stats)
    assert (v <= est).all() and (est <= bound).all()
    np.testing.assert_allclose(scale(stats, 4), est / 7, rtol=2.5e-7)
    # Observers stacked over layers fold with one vmapped update.
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), MinMaxObserver.create((3,)))
    stacked = jax.vmap(update)(stacked, jnp.asarray(x))
    np.testing.assert_array_equal(stacked.absmax, np.abs(x).max(axis=1))


def test_observer_errors():
    for empty in (
        MinMaxObserver.create((4,)),
        PercentileObserver.create(0.9995),
        update(MinMaxObserver.create(), np.zeros((0,), np.float32)),
    ):
        with pytest.raises(ValueError, match="no calibration data"):
            scale(empty, 8)
    for alpha in (0.0, -0.1, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\]"):
            PercentileObserver.create(alpha)
    with pytest.raises(ValueError, match="bins_per_octave must be a power of two"):
        PercentileObserver.create(0.9, bins_per_octave=100)
    with pytest.raises(ValueError, match="shape must be a tuple of positive ints"):
        MinMaxObserver.create((0, 3))
    seen = update(MinMaxObserver.create((4,)), np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        scale(seen, 9)
    with pytest.raises(ValueError, match=r"x of shape \(2, 5\) must end with the observer's shape \(4,\)"):
        update(seen, np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="expected a MinMaxObserver or PercentileObserver"):
        update(np.zeros(3), np.ones(3))


def test_all_zero_data_gives_a_zero_scale():
    for stats in (MinMaxObserver.create(), PercentileObserver.create(0.9995)):
        assert float(scale(update(stats, np.zeros((5, 3), np.float32)), 8)) == 0.0
