"""The Mosaic TPU variants of the Mamba-1 selective scan (prefill) and state update (decode), in TPU
interpret mode against their references (ragged lengths and channel counts, optional D / z / state,
float32 and bfloat16), their routing by the dispatchers on TPU, and their lowering for TPU on realistic
shapes (no TPU needed).

The TPU interpreter pads partial blocks with NaN and fills unwritten outputs with NaN, so
`assert_close` catches garbage steps leaking into the state and unwritten elements alike; the aliased
decode state is checked to be the new state, not the old one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, assert_step_close, dispatch_on_tpu

from pallas_kernels.selective_scan import (
    SelectiveScanTPUBlockSizes,
    SelectiveStateUpdateTPUBlockSizes,
    selective_scan,
    selective_scan_pallas_tpu,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_pallas_tpu,
    selective_state_update_ref,
)

S = jax.ShapeDtypeStruct


# Inputs drawn with numpy: eager jax.random would compile a little program per drawn shape.
def _inputs(seed, batch, steps, channels, n, dtype, use_d=True, use_z=True, use_state=True):
    rng = np.random.default_rng(seed)
    normal = lambda *shape, dt=dtype: jnp.asarray(rng.standard_normal(shape, np.float32), dt)  # noqa: E731
    return (
        normal(batch, steps, channels),
        jnp.asarray(np.log1p(np.exp(rng.standard_normal((batch, steps, channels)) - 1.0)), dtype),  # softplus
        -jnp.exp(normal(channels, n, dt=jnp.float32)),
        normal(batch, steps, n),
        normal(batch, steps, n),
        normal(channels, dt=jnp.float32) if use_d else None,
        normal(batch, steps, channels) if use_z else None,
        normal(batch, channels, n, dt=jnp.float32) if use_state else None,
    )


def _step_inputs(seed, batch, channels, n, dtype, use_d, use_z):
    """One decode step's (state, x, dt, A, B, C, D, z): `_inputs` of a single step."""
    x, dt, A, B, C, D, z, state = _inputs(seed, batch, 1, channels, n, dtype, use_d, use_z)
    return state, x[:, 0], dt[:, 0].astype(jnp.float32), A, B[:, 0], C[:, 0], D, None if z is None else z[:, 0]


def _check(got, args, dtype):
    (y, h), (y_ref, h_ref) = got, selective_scan_ref(*args)
    assert y.dtype == args[0].dtype and h.dtype == jnp.float32 and h.shape == h_ref.shape
    assert_close(y, y_ref, dtype)
    assert_close(h, h_ref, jnp.float32)  # the state is float32 whatever the input dtype


# One channel block and one time chunk (full-dim blocks of any size, length 1 included).
@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 24),
    channels=st.sampled_from([1, 5, 24]),
    n=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_d=st.booleans(),
    use_z=st.booleans(),
    use_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tpu_scan_matches_reference(batch, steps, channels, n, dtype, use_d, use_z, use_state, seed):
    args = _inputs(seed, batch, steps, channels, n, dtype, use_d, use_z, use_state)
    _check(selective_scan_pallas_tpu(*args, interpret=True), args, dtype)


@pytest.mark.parametrize("dtype,optional", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_tpu_scan_carries_state_across_chunks_and_blocks(dtype, optional):
    """128-channel blocks and 128-step chunks (the smallest TPU-legal ones): 130 channels and 260 steps
    take a partial last channel block and a partial last chunk, whose garbage (NaN) steps must not move
    the state."""
    args = _inputs(3, 1, 260, 130, 4, dtype, optional, optional, optional)
    blocks = SelectiveScanTPUBlockSizes(block_d=128, block_t=128)
    _check(selective_scan_pallas_tpu(*args, block_sizes=blocks, interpret=True), args, dtype)


# A small channel-block cap (16) makes ragged channel counts take several blocks or a full-dim one.
@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.sampled_from([6, 21, 48]),
    n=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_d=st.booleans(),
    use_z=st.booleans(),
    cap=st.sampled_from([16, 512]),
    seed=st.integers(0, 2**16),
)
def test_tpu_state_update_matches_reference(batch, channels, n, dtype, use_d, use_z, cap, seed):
    args = _step_inputs(seed, batch, channels, n, dtype, use_d, use_z)
    got = selective_state_update_pallas_tpu(
        *args, block_sizes=SelectiveStateUpdateTPUBlockSizes(block_d=cap), interpret=True
    )
    assert_step_close(got, selective_state_update_ref(*args), args[0], dtype)


def test_dispatchers_use_tpu_variants_on_tpu():
    """The jitted dispatchers' "pallas" and "auto" route to the TPU variants (with their block sizes: 8-channel
    decode blocks, several per sequence) and match the reference."""
    args = _inputs(1, 2, 9, 8, 4, jnp.float32)
    _check(dispatch_on_tpu(selective_scan, "selective_scan_pallas_tpu", *args), args, jnp.float32)
    args = _step_inputs(1, 2, 24, 16, jnp.float32, True, True)
    got = dispatch_on_tpu(
        selective_state_update,
        "selective_state_update_pallas_tpu",
        *args,
        block_sizes=SelectiveStateUpdateTPUBlockSizes(block_d=8),
    )
    assert_step_close(got, selective_state_update_ref(*args), args[0], jnp.float32)


def test_tpu_scan_rejects_bad_input():
    ones = jnp.ones
    with pytest.raises(ValueError, match="B must have shape"):  # B: [Bt, T, N - 1]
        selective_scan_pallas_tpu(
            ones((1, 3, 8)), ones((1, 3, 8)), ones((8, 4)), ones((1, 3, 3)), ones((1, 3, 4)), interpret=True
        )
    with pytest.raises(ValueError, match="state must have shape"):  # state: [Bt, N, Dm]
        selective_scan_pallas_tpu(
            ones((1, 3, 8)),
            ones((1, 3, 8)),
            ones((8, 4)),
            ones((1, 3, 4)),
            ones((1, 3, 4)),
            state=ones((1, 4, 8)),
            interpret=True,
        )
    with pytest.raises(ValueError, match="B must have shape"):  # B: [Bt, N - 1]
        selective_state_update_pallas_tpu(
            ones((1, 8, 4)), ones((1, 8)), ones((1, 8)), ones((8, 4)), ones((1, 3)), ones((1, 4)), interpret=True
        )
    with pytest.raises(ValueError, match="SelectiveScanTPUBlockSizes: block_t must be a positive multiple of 128"):
        SelectiveScanTPUBlockSizes(block_t=64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_scan_lowers_to_mosaic(dtype):
    f32 = jnp.float32
    # Mamba-1 2.8B-like: 5120 channels (10 blocks), N = 16, 1000 steps (a partial last chunk), D, z and state.
    batch, steps, channels, n = 2, 1000, 5120, 16
    per_time, per_step = S((batch, steps, channels), dtype), S((batch, steps, n), dtype)
    assert_lowers_to_mosaic_tpu(
        lambda *a: selective_scan_pallas_tpu(*a),
        per_time,
        per_time,
        S((channels, n), f32),
        per_step,
        per_step,
        S((channels,), f32),
        per_time,
        S((batch, channels, n), f32),
    )
    # Mamba-130m-like (1536 channels) with a short prompt (one full-length chunk) and no optional inputs;
    # 1000 channels (not a multiple of 128: a partial last block).
    for steps, channels in ((7, 1536), (300, 1000)):
        per_time, per_step = S((batch, steps, channels), dtype), S((batch, steps, n), dtype)
        assert_lowers_to_mosaic_tpu(
            lambda *a: selective_scan_pallas_tpu(*a), per_time, per_time, S((channels, n), f32), per_step, per_step
        )
    # The decode step of the 2.8B-like layer: 5120 channels (several blocks), batch 8, with D and z.
    batch, channels = 8, 5120
    assert_lowers_to_mosaic_tpu(
        lambda *a: selective_state_update_pallas_tpu(*a),
        S((batch, channels, n), f32),
        S((batch, channels), dtype),
        S((batch, channels), dtype),
        S((channels, n), f32),
        S((batch, n), dtype),
        S((batch, n), dtype),
        S((channels,), f32),
        S((batch, channels), dtype),
    )
