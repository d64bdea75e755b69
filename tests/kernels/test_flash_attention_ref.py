"""Prefill attention reference against a naive float64 loop, on hypothesis-drawn shapes; the dispatchers'
reference path and their errors for unavailable impls."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import naive_attention

from pallas_kernels import cache_attention, flash_attention, flash_attention_ref
from pallas_kernels.dispatch import resolve_impl

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "kv_heads": st.integers(1, 3),
        "group": st.integers(1, 3),
        "dim": st.sampled_from([4, 8, 16]),
        "window": st.sampled_from([0, 1, 3, 7]),
        "seed": st.integers(0, 2**31),
    }
)


@settings(max_examples=8, deadline=None)
@given(shapes=shapes, steps=st.integers(1, 40), block=st.sampled_from([4, 7, 16, 128]))
def test_flash_attention_ref_matches_naive(shapes, steps, block):
    rng = np.random.default_rng(shapes["seed"])
    b, hk, g, d = shapes["batch"], shapes["kv_heads"], shapes["group"], shapes["dim"]
    q = rng.standard_normal((b, steps, hk * g, d)).astype(np.float32)
    k = rng.standard_normal((b, steps, hk, d)).astype(np.float32)
    v = rng.standard_normal((b, steps, hk, d)).astype(np.float32)
    out = flash_attention_ref(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), shapes["window"], block=block)
    positions = np.tile(np.arange(steps), (b, 1))
    expected = naive_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, [steps] * b, shapes["window"]
    )
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_bf16_inputs_keep_f32_softmax():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 9, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 9, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 9, 2, 16)).astype(np.float32)
    out = flash_attention_ref(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    expected = naive_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), np.tile(np.arange(9), (2, 1)), [9, 9], 0
    )
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.05)


def test_dispatchers_run_the_reference_and_reject_unavailable_impls():
    q = jnp.ones((1, 2, 2, 4))
    k = jnp.ones((1, 2, 1, 4))
    np.testing.assert_array_equal(flash_attention(q, k, k, impl="xla"), flash_attention_ref(q, k, k))
    with pytest.raises(ValueError, match="flash_attention: unknown impl 'cuda'"):
        flash_attention(q, k, k, impl="cuda")
    with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
        cache_attention(
            q, k.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), jnp.zeros((1, 2), int), jnp.array([2]), impl="pallas"
        )
    with pytest.raises(ValueError, match="has no Pallas kernel yet"):
        resolve_impl("interpret", "some_kernel")
    assert resolve_impl("auto", "x", ("gpu",)) == "xla"  # on CPU, auto is the reference
