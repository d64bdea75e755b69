"""The Pallas (Triton) Mamba-2 SSD kernels in interpret mode: the chunked scan (prefill) against
`ssd_chunked_ref` on hypothesis-drawn shapes (lengths not multiples of the kernel's chunk, length 1, head
channels and state sizes that are not powers of two or are below Triton's dot minimum of 16), dtypes,
options and block sizes, and the decode step against `ssd_step_ref` (its aliased state checked to be
rewritten); padding semantics, jit, errors and the Triton lowering for a GPU on realistic shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, INTERPRET, assert_close, assert_lowers_to_triton, assert_step_close

from pallas_kernels.lowering import is_power_of_two
from pallas_kernels.ssd import (
    SSDChunkedBlockSizes,
    SSDChunkedTPUBlockSizes,
    ssd_chunked,
    ssd_chunked_pallas,
    ssd_chunked_ref,
    ssd_step,
    ssd_step_pallas,
    ssd_step_ref,
)


def _inputs(seed, batch, steps, heads, groups, head_dim, n, dtype):
    """x, dt (softplus'ed), A (< 0), B, C, D, state with realistic scales. Drawn with numpy: jax.random
    would compile per shape, which dominates the time of these tests."""
    normal = np.random.default_rng(seed).standard_normal
    x = jnp.asarray(normal((batch, steps, heads, head_dim)), dtype)
    dt = jnp.asarray(np.logaddexp(0.0, normal((batch, steps, heads)) - 1.0), jnp.float32)
    A, D = jnp.asarray(-np.exp(normal(heads)), jnp.float32), jnp.asarray(normal(heads), jnp.float32)
    B, C = (jnp.asarray(normal((batch, steps, groups, n)), dtype) for _ in range(2))
    state = jnp.asarray(normal((batch, heads, head_dim, n)), jnp.float32)
    return x, dt, A, B, C, D, state


# Block sizes: the defaults (64-step chunks, 32 head channels per program) or the smallest (16 and 16).
@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.one_of(st.just(1), st.integers(2, 150)),
    heads_per_group=st.integers(1, 3),
    groups=st.integers(1, 2),
    head_dim=st.sampled_from([16, 32, 8, 24, 48]),
    n=st.sampled_from([16, 32, 5, 40]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_d=st.booleans(),
    use_state=st.booleans(),
    chunk_size=st.sampled_from([8, 64, 256]),
    blocks=st.sampled_from([None, SSDChunkedBlockSizes(16, 16)]),
    seed=st.integers(0, 2**16),
)
def test_ssd_chunked_kernel_matches_reference(
    batch, steps, heads_per_group, groups, head_dim, n, dtype, use_d, use_state, chunk_size, blocks, seed
):
    x, dt, A, B, C, D, state = _inputs(seed, batch, steps, heads_per_group * groups, groups, head_dim, n, dtype)
    D, state = (D if use_d else None), (state if use_state else None)
    y, final = ssd_chunked(x, dt, A, B, C, D, state, chunk_size, block_sizes=blocks, impl=IMPL)
    y_ref, final_ref = ssd_chunked_ref(x, dt, A, B, C, D, state, chunk_size)
    assert y.dtype == x.dtype and final.dtype == jnp.float32 and final.shape == final_ref.shape
    # Outputs sum up to 150 steps of O(1) terms (|y| up to ~85): float32 errors grow with that, to 2.4e-5 in y
    # and 2.1e-5 in the final state over 150 draws, so float32 is checked at 3x TOL (6e-5); bfloat16 y at TOL
    # (2e-2; worst 5.9e-3, a rounding of the output).
    scale = 3.0 if dtype == jnp.float32 else 1.0
    assert_close(y, y_ref, dtype, scale=scale)
    assert_close(final, final_ref, jnp.float32, scale=3.0)


def test_ssd_chunked_kernel_zero_dt_steps_freeze_the_state_under_jit():
    """Right padding with dt = 0 (any x, B, C there) leaves the final state of the real steps, in a jitted
    call, across several of the kernel's chunks; all-zero dt returns the entering state exactly."""
    x, dt, A, B, C, D, state = _inputs(0, 2, 130, 4, 2, 16, 16, jnp.float32)
    run = jax.jit(lambda x, dt, B, C: ssd_chunked(x, dt, A, B, C, D, state, impl=IMPL))
    y_pad, final_pad = run(x, dt.at[:, 90:].set(0.0), B, C)
    y, final = run(x[:, :90], dt[:, :90], B[:, :90], C[:, :90])
    assert_close(final_pad, final, jnp.float32)
    assert_close(y_pad[:, :90], y, jnp.float32)
    _, frozen = run(x, jnp.zeros_like(dt), B, C)
    np.testing.assert_array_equal(np.asarray(frozen), np.asarray(state))


def test_ssd_chunked_gives_clear_errors():
    x, dt, A, B, C, _, _ = _inputs(0, 1, 4, 3, 1, 16, 16, jnp.float32)
    if jax.default_backend() == "cpu":  # on a GPU, impl="pallas" compiles
        with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
            ssd_chunked(x, dt, A, B, C, impl="pallas")
    with pytest.raises(ValueError, match=r"heads \(3\) must be a multiple of the B/C groups \(2\)"):
        ssd_chunked(x, dt, A, jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2, 16)), impl=IMPL)
    with pytest.raises(ValueError, match=r"state must have shape \(1, 3, 16, 16\), got \(1, 3, 16, 8\)"):
        ssd_chunked(x, dt, A, B, C, state=jnp.zeros((1, 3, 16, 8)), impl=IMPL)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        ssd_chunked(x, dt, A, B, C, chunk_size=0, impl=IMPL)
    with pytest.raises(ValueError, match="unknown impl 'triton'"):
        ssd_chunked(x, dt, A, B, C, impl="triton")
    with pytest.raises(ValueError, match="ssd_chunked: block_sizes must be a SSDChunkedBlockSizes"):
        ssd_chunked(x, dt, A, B, C, block_sizes=SSDChunkedTPUBlockSizes(), impl=IMPL)
    with pytest.raises(ValueError, match="SSDChunkedBlockSizes: chunk must be a power of two >= 16, got 8"):
        SSDChunkedBlockSizes(chunk=8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ssd_chunked_kernel_lowers_to_triton_for_gpu(dtype):
    def shapes(batch, steps, heads, head_dim, groups, n, with_state):
        s = jax.ShapeDtypeStruct
        args = [
            s((batch, steps, heads, head_dim), dtype),
            s((batch, steps, heads), jnp.float32),
            s((heads,), jnp.float32),
            s((batch, steps, groups, n), dtype),
            s((batch, steps, groups, n), dtype),
            s((heads,), jnp.float32),
        ]
        return args + [s((batch, heads, head_dim, n), jnp.float32)] if with_state else args

    assert_lowers_to_triton(ssd_chunked_pallas, *shapes(1, 2048, 24, 64, 1, 128, False))  # a Mamba-2 130M layer
    assert_lowers_to_triton(ssd_chunked_pallas, *shapes(2, 100, 6, 48, 2, 40, True))  # masked P, N and T
    assert_lowers_to_triton(ssd_chunked_pallas, *shapes(1, 1, 2, 8, 1, 5, True))


def _step_inputs(seed, batch, heads, groups, head_dim, n, dtype, use_d):
    """One decode step's (state, x, dt, A, B, C, D): `_inputs` of a single step, the state float32."""
    x, dt, A, B, C, D, state = _inputs(seed, batch, 1, heads, groups, head_dim, n, dtype)
    return state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D if use_d else None


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads_per_group=st.integers(1, 3),
    groups=st.integers(1, 3),
    head_dim=st.sampled_from([1, 3, 8, 16]),
    n=st.sampled_from([1, 5, 8, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ssd_step_kernel_matches_reference(batch, heads_per_group, groups, head_dim, n, dtype, use_d, seed):
    # Compiled, the Triton step kernel takes power-of-two sizes only (the dispatcher says so; the interpreter
    # takes any): found on the first GPU run, where impl="pallas" drew head_dim 1 and state size 5.
    assume(INTERPRET or (is_power_of_two(head_dim) and is_power_of_two(n)))
    args = _step_inputs(seed, batch, heads_per_group * groups, groups, head_dim, n, dtype, use_d)
    assert_step_close(ssd_step(*args, impl=IMPL), ssd_step_ref(*args), args[0], dtype)


def test_ssd_step_kernel_runs_under_jit_and_freezes_on_zero_dt():
    state, x, dt, A, B, C, _ = _step_inputs(0, 2, 4, 2, 8, 16, jnp.float32, False)
    step = jax.jit(lambda s, dt: ssd_step(s, x, dt, A, B, C, impl=IMPL))
    _, new = step(state, jnp.zeros_like(dt))
    np.testing.assert_array_equal(np.asarray(new), np.asarray(state))


def test_ssd_step_gives_clear_errors():
    state = jnp.zeros((1, 4, 8, 16))
    if jax.default_backend() == "cpu":  # on a GPU, impl="pallas" compiles
        with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
            ssd_step(
                state,
                jnp.zeros((1, 4, 8)),
                jnp.zeros((1, 4)),
                jnp.zeros((4,)),
                jnp.zeros((1, 2, 16)),
                jnp.zeros((1, 2, 16)),
                impl="pallas",
            )
    with pytest.raises(ValueError, match=r"ssd: C must have shape \(1, 1, 2, 16\), got \(1, 1, 2, 8\)"):
        ssd_step(
            state,
            jnp.zeros((1, 4, 8)),
            jnp.zeros((1, 4)),
            jnp.zeros((4,)),
            jnp.zeros((1, 2, 16)),
            jnp.zeros((1, 2, 8)),
            impl=IMPL,
        )


def test_ssd_step_lowers_to_triton_for_gpu():
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    assert_lowers_to_triton(
        ssd_step_pallas, f32(2, 4, 64, 128), f32(2, 4, 64), f32(2, 4), f32(4), f32(2, 2, 128), f32(2, 2, 128), f32(4)
    )
