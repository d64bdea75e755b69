"""Pallas (Triton) Mamba-1 kernels in interpret mode against their references on hypothesis-drawn shapes,
dtypes and block sizes: the selective scan (prefill) and the state update (decode; its aliased state is
checked to be rewritten); errors, and their Triton lowering for CUDA on realistic shapes.

Sizes cover lengths that are not multiples of the time chunk (and length 1), channel counts that are
not multiples of the channel block, and state sizes that are not powers of two: all of them go through
the kernel's masked loads and stores. Interpret mode fills unwritten outputs with NaN, which
`assert_close` rejects. Inputs come from numpy (jax.random would compile for every drawn shape) and
both implementations are jitted, to keep the file fast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, INTERPRET, assert_close, assert_lowers_to_triton, assert_step_close

from pallas_kernels.selective_scan import (
    SelectiveScanBlockSizes,
    SelectiveStateUpdateBlockSizes,
    selective_scan,
    selective_scan_pallas,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_pallas,
    selective_state_update_ref,
)

DEFAULTS = SelectiveScanBlockSizes()
scan_kernel = jax.jit(functools.partial(selective_scan, impl=IMPL), static_argnames="block_sizes")
scan_ref = jax.jit(selective_scan_ref)


def _inputs(seed, batch, steps, channels, n, dtype, use_d=True, use_z=True, use_state=True):
    rng = np.random.default_rng(seed)
    normal = lambda *shape, dt=dtype: jnp.asarray(rng.standard_normal(shape, np.float32), dt)  # noqa: E731
    return dict(
        x=normal(batch, steps, channels),
        dt=jnp.asarray(np.log1p(np.exp(rng.standard_normal((batch, steps, channels)) - 1.0)), dtype),  # softplus
        A=-jnp.exp(normal(channels, n, dt=jnp.float32)),
        B=normal(batch, steps, n),
        C=normal(batch, steps, n),
        D=normal(channels, dt=jnp.float32) if use_d else None,
        z=normal(batch, steps, channels) if use_z else None,
        state=normal(batch, channels, n, dt=jnp.float32) if use_state else None,
    )


# Small blocks (8 channels, 4 steps) make short shapes span several time chunks and channel blocks.
@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 70),
    channels=st.sampled_from([1, 5, 32, 45, 70]),
    n=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_d=st.booleans(),
    use_z=st.booleans(),
    use_state=st.booleans(),
    blocks=st.sampled_from([None, SelectiveScanBlockSizes(block_d=8, block_t=4)]),
    seed=st.integers(0, 2**16),
)
@example(
    batch=1, steps=1, channels=5, n=4, dtype=jnp.float32, use_d=True, use_z=True, use_state=True, blocks=None, seed=0
)
@example(
    batch=2,
    steps=DEFAULTS.block_t + 3,
    channels=DEFAULTS.block_d + 13,
    n=16,
    dtype=jnp.bfloat16,
    use_d=False,
    use_z=True,
    use_state=False,
    blocks=None,
    seed=1,
)
def test_selective_scan_kernel_matches_reference(
    batch, steps, channels, n, dtype, use_d, use_z, use_state, blocks, seed
):
    inputs = _inputs(seed, batch, steps, channels, n, dtype, use_d, use_z, use_state)
    y, h = scan_kernel(**inputs, block_sizes=blocks)
    y_ref, h_ref = scan_ref(**inputs)
    assert y.dtype == inputs["x"].dtype and h.dtype == jnp.float32 and h.shape == (batch, channels, n)
    assert_close(y, y_ref, dtype)
    assert_close(h, h_ref, jnp.float32)  # the state is float32 whatever the input dtype


def test_zero_dt_steps_freeze_the_state():
    """A sequence whose steps all have dt = 0 (as right padding has) ends exactly in its initial state,
    across several time chunks and channel blocks; the other sequence moves."""
    inputs = _inputs(3, 2, 2 * DEFAULTS.block_t + 5, DEFAULTS.block_d + 5, 5, jnp.float32)
    inputs["dt"] = inputs["dt"].at[1].set(0.0)
    _, h = scan_kernel(**inputs)
    np.testing.assert_array_equal(np.asarray(h[1]), np.asarray(inputs["state"][1]))
    assert not np.allclose(np.asarray(h[0]), np.asarray(inputs["state"][0]))


def test_empty_sequence_returns_the_state():
    inputs = _inputs(0, 1, 0, 6, 3, jnp.float32)
    y, h = selective_scan_pallas(**inputs, interpret=INTERPRET)
    assert y.shape == (1, 0, 6)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(inputs["state"]))


def test_selective_scan_gives_clear_errors():
    inputs = _inputs(0, 1, 4, 6, 3, jnp.float32)
    if jax.default_backend() == "cpu":  # on a GPU, impl="pallas" compiles
        with pytest.raises(ValueError, match="selective_scan: no compiled Pallas kernel for backend 'cpu'"):
            selective_scan(**inputs, impl="pallas")
    with pytest.raises(ValueError, match="selective_scan: unknown impl 'triton'"):
        selective_scan(**inputs, impl="triton")
    with pytest.raises(ValueError, match=r"selective_scan: C must have shape \(1, 4, 3\), got \(1, 4, 2\)"):
        selective_scan_pallas(**{**inputs, "C": jnp.zeros((1, 4, 2))}, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"selective_scan: state must have shape \(1, 6, 3\), got \(6, 3\)"):
        selective_scan(**{**inputs, "state": jnp.zeros((6, 3))}, impl=IMPL)
    with pytest.raises(ValueError, match="selective_scan: block_sizes must be a SelectiveScanBlockSizes"):
        selective_scan(**inputs, block_sizes=SelectiveStateUpdateBlockSizes(), impl=IMPL)


def test_selective_scan_lowers_to_triton_for_gpu():
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    # Mamba-130m prefill: Bt=1, T=2048, Dm=1536, N=16, with and without D / z / state.
    seq, A, BC = f32(1, 2048, 1536), f32(1536, 16), f32(1, 2048, 16)
    assert_lowers_to_triton(selective_scan_pallas, seq, seq, A, BC, BC, f32(1536), seq, f32(1, 1536, 16))
    assert_lowers_to_triton(selective_scan_pallas, seq, seq, A, BC, BC)
    # bfloat16 activations and sizes that need masking everywhere (T, Dm, N not powers of two).
    seq, BC = bf16(2, 333, 1000), bf16(2, 333, 5)
    assert_lowers_to_triton(
        selective_scan_pallas, seq, f32(2, 333, 1000), f32(1000, 5), BC, BC, bf16(1000), seq, f32(2, 1000, 5)
    )


# Channel blocks of 64 (the default) or 8; the block is the largest power of two at most that dividing Dm.
@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.sampled_from([1, 6, 24, 96, 130]),
    n=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_d=st.booleans(),
    use_z=st.booleans(),
    blocks=st.sampled_from([None, SelectiveStateUpdateBlockSizes(block_d=8)]),
    seed=st.integers(0, 2**16),
)
def test_selective_state_update_kernel_matches_reference(batch, channels, n, dtype, use_d, use_z, blocks, seed):
    inputs = _inputs(seed, batch, 1, channels, n, dtype, use_d, use_z)
    step = {k: (v[:, 0] if k in ("x", "dt", "B", "C", "z") and v is not None else v) for k, v in inputs.items()}
    args = [step[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z")]
    got = selective_state_update(*args, block_sizes=blocks, impl=IMPL)
    assert_step_close(got, selective_state_update_ref(*args), args[0], dtype)


def test_selective_state_update_gives_clear_errors():
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        selective_state_update(
            jnp.zeros((1, 4, 2)),
            jnp.zeros((1, 4)),
            jnp.zeros((1, 4)),
            jnp.zeros((4, 2)),
            jnp.zeros((1, 2)),
            jnp.zeros((1, 2)),
            impl="cuda",
        )
    with pytest.raises(ValueError, match="SelectiveStateUpdateBlockSizes: block_d must be a power of two"):
        SelectiveStateUpdateBlockSizes(block_d=48)


def test_selective_state_update_lowers_to_triton_for_gpu():
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    assert_lowers_to_triton(
        selective_state_update_pallas,
        f32(2, 96, 16),
        f32(2, 96),
        f32(2, 96),
        f32(96, 16),
        f32(2, 16),
        f32(2, 16),
        f32(96),
        f32(2, 96),
    )
