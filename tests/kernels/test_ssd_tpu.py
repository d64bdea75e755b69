"""The Mosaic TPU variants of the Mamba-2 SSD chunked scan (prefill) and decode step, in TPU interpret mode
against their references on hypothesis-drawn ragged shapes (T not a multiple of the chunk, length 1, B/C
read in place or moved per group), plus dispatch on TPU under jit, errors and the Mosaic lowering on
realistic shapes (no TPU needed for either). Interpret mode fills unwritten outputs with NaN:
`assert_close` fails on them; the aliased decode state is checked to be rewritten.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, assert_step_close, dispatch_on_tpu

from pallas_kernels.ssd import (
    SSDChunkedTPUBlockSizes,
    ssd_chunked,
    ssd_chunked_pallas_tpu,
    ssd_chunked_ref,
    ssd_step,
    ssd_step_pallas_tpu,
    ssd_step_ref,
)

S = jax.ShapeDtypeStruct


def _inputs(seed, batch, steps, heads, groups, head_dim, n, dtype):
    """x, dt (softplus'ed), A (< 0), B, C, D, state, drawn with numpy (jax.random compiles per shape)."""
    normal = np.random.default_rng(seed).standard_normal
    x = jnp.asarray(normal((batch, steps, heads, head_dim)), dtype)
    dt = jnp.asarray(np.logaddexp(0.0, normal((batch, steps, heads)) - 1.0), jnp.float32)
    A, D = jnp.asarray(-np.exp(normal(heads)), jnp.float32), jnp.asarray(normal(heads), jnp.float32)
    B, C = (jnp.asarray(normal((batch, steps, groups, n)), dtype) for _ in range(2))
    return x, dt, A, B, C, D, jnp.asarray(normal((batch, heads, head_dim, n)), jnp.float32)


def _check(got, want, dtype):
    (y, final), (y_ref, final_ref) = got, want
    assert y.dtype == y_ref.dtype and final.dtype == jnp.float32 and final.shape == final_ref.shape
    # At most 40 steps here: within TOL (worst over 40 draws: float32 y 5.4e-6, final 2.5e-6, bfloat16 y 5.9e-3).
    assert_close(y, y_ref, dtype)
    assert_close(final, final_ref, jnp.float32)


# Chunks of 16 or 32 steps so tiny T spans several, the last one overhanging T; n = 128 with 2 groups reads
# B/C in place as [Bt, T, G * N], n = 5 or 16 with 2 groups moves them to [Bt, G, T, N].
@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.one_of(st.just(1), st.integers(2, 40)),
    heads_per_group=st.integers(1, 2),
    groups=st.integers(1, 2),
    head_dim=st.sampled_from([3, 8]),
    n=st.sampled_from([5, 16, 128]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_d=st.booleans(),
    use_state=st.booleans(),
    chunk=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_ssd_chunked_tpu_matches_reference(
    batch, steps, heads_per_group, groups, head_dim, n, dtype, use_d, use_state, chunk, seed
):
    x, dt, A, B, C, D, state = _inputs(seed, batch, steps, heads_per_group * groups, groups, head_dim, n, dtype)
    D, state = (D if use_d else None), (state if use_state else None)
    got = ssd_chunked_pallas_tpu(x, dt, A, B, C, D, state, block_sizes=SSDChunkedTPUBlockSizes(chunk), interpret=True)
    _check(got, ssd_chunked_ref(x, dt, A, B, C, D, state), dtype)


def _step_inputs(seed, batch, heads, groups, head_dim, n, dtype, state_dtype, use_d):
    """One decode step's (state, x, dt, A, B, C, D): `_inputs` of a single step."""
    x, dt, A, B, C, D, state = _inputs(seed, batch, 1, heads, groups, head_dim, n, dtype)
    return state.astype(state_dtype), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D if use_d else None


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads_per_group=st.integers(1, 2),
    groups=st.integers(1, 2),
    head_dim=st.sampled_from([1, 3, 8]),
    n=st.sampled_from([1, 5, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    state_bf16=st.booleans(),
    use_d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ssd_step_tpu_matches_reference(batch, heads_per_group, groups, head_dim, n, dtype, state_bf16, use_d, seed):
    state_dtype = jnp.bfloat16 if state_bf16 else jnp.float32
    args = _step_inputs(seed, batch, heads_per_group * groups, groups, head_dim, n, dtype, state_dtype, use_d)
    assert_step_close(ssd_step_pallas_tpu(*args, interpret=True), ssd_step_ref(*args), args[0], dtype)


def test_dispatchers_use_tpu_variants_on_tpu():
    """The jitted dispatchers' "pallas" and "auto" run the TPU variants (interpreted here; the scan in 3
    chunks of 16); a sequence with all-zero dt keeps its entering state exactly."""
    x, dt, A, B, C, D, state = _inputs(0, 2, 40, 4, 2, 8, 16, jnp.float32)
    dt = dt.at[1].set(0.0)
    got = dispatch_on_tpu(
        ssd_chunked, "ssd_chunked_pallas_tpu", x, dt, A, B, C, D, state, block_sizes=SSDChunkedTPUBlockSizes(chunk=16)
    )
    _check(got, ssd_chunked_ref(x, dt, A, B, C, D, state), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got[1][1]), np.asarray(state[1]))
    args = _step_inputs(1, 2, 4, 2, 8, 16, jnp.float32, jnp.float32, True)
    assert_step_close(
        dispatch_on_tpu(ssd_step, "ssd_step_pallas_tpu", *args), ssd_step_ref(*args), args[0], jnp.float32
    )


def test_ssd_chunked_tpu_rejects_bad_input():
    x, dt, A, B, C, D, state = _inputs(0, 1, 4, 2, 1, 8, 16, jnp.float32)
    with pytest.raises(ValueError, match="SSDChunkedTPUBlockSizes: chunk must be a positive multiple of 16, got 24"):
        SSDChunkedTPUBlockSizes(chunk=24)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ssd_chunked_pallas_tpu(x, dt, A, B, C, chunk_size=0, interpret=True)
    with pytest.raises(ValueError, match="multiple of the B/C groups"):  # 3 heads, 2 groups
        bad = _inputs(0, 1, 4, 3, 2, 8, 16, jnp.float32)
        ssd_chunked_pallas_tpu(*bad[:5], interpret=True)
    with pytest.raises(ValueError, match="state must have shape"):
        ssd_chunked_pallas_tpu(x, dt, A, B, C, D, state[:, :1], interpret=True)
    with pytest.raises(ValueError, match="multiple of the B/C groups"):  # 3 heads, 2 groups
        ones = jnp.ones
        ssd_step_pallas_tpu(
            ones((1, 3, 4, 4)), ones((1, 3, 4)), ones((1, 3)), ones(3), ones((1, 2, 4)), ones((1, 2, 4)), interpret=True
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_ssd_tpu_lowers_to_mosaic(dtype):
    f32 = jnp.float32
    # Mamba-2 2.7B-like: 80 heads of 64 channels, N = 128, one group; 1000-step prefill (8 chunks, the last
    # overhanging), D and an entering state given.
    batch, steps, heads, head_dim, n = 2, 1000, 80, 64, 128
    assert_lowers_to_mosaic_tpu(
        lambda *a: ssd_chunked_pallas_tpu(*a),
        S((batch, steps, heads, head_dim), dtype),
        S((batch, steps, heads), f32),
        S((heads,), f32),
        S((batch, steps, 1, n), dtype),
        S((batch, steps, 1, n), dtype),
        S((heads,), f32),
        S((batch, heads, head_dim, n), f32),
    )
    # 8 groups of N = 128 (read in place) and of N = 64 (moved per group), no D or state.
    for n in (128, 64):
        group = S((1, 512, 8, n), dtype)
        assert_lowers_to_mosaic_tpu(
            lambda *a: ssd_chunked_pallas_tpu(*a),
            S((1, 512, 32, 64), dtype),
            S((1, 512, 32), f32),
            S((32,), f32),
            group,
            group,
        )
    # The decode step of the 2.7B-like layer: batch 8, D given.
    batch, heads, head_dim, n = 8, 80, 64, 128
    assert_lowers_to_mosaic_tpu(
        lambda *a: ssd_step_pallas_tpu(*a),
        S((batch, heads, head_dim, n), dtype),
        S((batch, heads, head_dim), dtype),
        S((batch, heads), f32),
        S((heads,), f32),
        S((batch, 1, n), dtype),
        S((batch, 1, n), dtype),
        S((heads,), f32),
    )
