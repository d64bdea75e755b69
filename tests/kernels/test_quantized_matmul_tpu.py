"""TPU (Mosaic) variant of the quantized matmul, weight-only and integer-activation (W8A8 / W4A8): TPU
interpret mode against the references on hypothesis-drawn ragged shapes, bits, group sizes and dtypes
(with small block caps, so partial M / N blocks and several K steps occur), the dispatchers' route to it
on TPU under jit (even for group sizes the GPU kernel rejects), clear errors, and the Mosaic lowering on
decode shapes (no TPU needed for either).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, dispatch_on_tpu, random_int8_inputs

from pallas_kernels.quantized_matmul import (
    QuantizedMatmulTPUBlockSizes,
    QuantizedWeight,
    pack_int4,
    quantize_weights,
    quantized_matmul,
    quantized_matmul_int8,
    quantized_matmul_int8_pallas_tpu,
    quantized_matmul_int8_ref,
    quantized_matmul_pallas_tpu,
    quantized_matmul_ref,
)

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
S = jax.ShapeDtypeStruct
# Small caps: 16 rows (one 32-row tile for int8 x), 128 columns and 64 rows of K per step make tiny shapes
# take several blocks.
SMALL_BLOCKS = QuantizedMatmulTPUBlockSizes(block_m=16, block_n=128, block_k=64)
int8_reference = jax.jit(quantized_matmul_int8_ref, static_argnums=3)


def _inputs(seed, lead, k, n, dtype, bits, group, scale_dtype):
    """x [*lead, K] scaled so outputs are O(1); w [K, N] standard normal, quantized (numpy draws: eager
    jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, k), np.float32) / np.sqrt(k), dtype)
    return x, quantize_weights(jnp.asarray(rng.standard_normal((k, n), np.float32)), bits, group, scale_dtype)


@settings(max_examples=4, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    m=st.sampled_from([1, 5, 19]),
    group=st.sampled_from([2, 16, 32, 48]),
    groups=st.integers(1, 3),
    n=st.sampled_from([1, 24, 130]),
    dtype=DTYPES,
    scale_dtype=DTYPES,
    small=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tpu_kernel_matches_reference(bits, m, group, groups, n, dtype, scale_dtype, small, seed):
    x, qw = _inputs(seed, (m,), group * groups, n, dtype, bits, group, scale_dtype)
    got = quantized_matmul_pallas_tpu(x, qw, block_sizes=SMALL_BLOCKS if small else None, interpret=True)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close(got, quantized_matmul_ref(x, qw), dtype)


def test_tpu_kernel_unpacks_int4_extremes_across_k_steps():
    """Both nibbles hit -8 and 7; two groups of 64 rows with 64-row K steps: the accumulator carries."""
    q = jnp.array([[-8, 7, 0, -1], [7, -8, 1, 0]] * 64, jnp.int32)  # [128, 4]
    qw = QuantizedWeight(pack_int4(q), jnp.array([[1.0] * 4, [2.0] * 4], jnp.float32), bits=4, group_size=64)
    picked = np.array([0, 1, 64, 127])  # rows 0 and 1 of group 0 (scale 1), 64 and 127 of group 1 (scale 2)
    got = quantized_matmul_pallas_tpu(
        jnp.eye(128, dtype=jnp.float32)[picked], qw, block_sizes=SMALL_BLOCKS, interpret=True
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(q)[picked] * np.array([[1], [1], [2], [2]]))


@settings(max_examples=4, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    m=st.sampled_from([1, 5, 40]),
    group=st.sampled_from([2, 16, 48, 64]),
    groups=st.integers(1, 3),
    n=st.sampled_from([1, 24, 130]),
    small=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tpu_int8_kernel_matches_reference(bits, m, group, groups, n, small, seed):
    xq, x_scale, qw = random_int8_inputs(seed, (m,), group * groups, n, bits, group)
    got = quantized_matmul_int8_pallas_tpu(xq, x_scale, qw, block_sizes=SMALL_BLOCKS if small else None, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert_close(got, int8_reference(xq, x_scale, qw, jnp.float32), jnp.float32)


def test_dispatchers_use_tpu_variants_on_tpu():
    """The jitted dispatchers' "pallas" and "auto" route to the TPU variants (here interpreted) for leading
    dims [2, 3], even for a group size the GPU kernel rejects."""
    x, qw = _inputs(1, (2, 3), 96, 40, jnp.bfloat16, 4, 16, jnp.float32)
    got = dispatch_on_tpu(quantized_matmul, "quantized_matmul_pallas_tpu", x, qw, block_sizes=SMALL_BLOCKS)
    assert got.shape == (2, 3, 40)
    assert_close(got, quantized_matmul_ref(x, qw), jnp.bfloat16)
    xq, x_scale, qw = random_int8_inputs(1, (2, 3), 96, 40, 4, 16)
    got = dispatch_on_tpu(quantized_matmul_int8, "quantized_matmul_int8_pallas_tpu", xq, x_scale, qw)
    assert got.shape == (2, 3, 40)
    assert_close(got, int8_reference(xq, x_scale, qw, jnp.float32), jnp.float32)


def test_tpu_kernel_rejects_bad_input():
    qw = quantize_weights(jnp.ones((64, 8)), 8, 32)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 64\]"):
        quantized_matmul_pallas_tpu(jnp.ones((2, 32)), qw, interpret=True)
    with pytest.raises(ValueError, match="x must be floating point"):
        quantized_matmul_pallas_tpu(jnp.ones((2, 64), jnp.int32), qw, interpret=True)
    with pytest.raises(ValueError, match="4-bit values must be uint8"):
        quantized_matmul_pallas_tpu(
            jnp.ones((2, 64)), QuantizedWeight(qw.values[:32], qw.scales, 4, 32), interpret=True
        )
    with pytest.raises(ValueError, match="QuantizedMatmulTPUBlockSizes: block_n must be a positive multiple of 128"):
        QuantizedMatmulTPUBlockSizes(block_n=64)


@pytest.mark.parametrize("m, k, n", [(1, 576, 1536), (8, 4096, 11008), (300, 4096, 1000)])
@pytest.mark.parametrize("bits", [4, 8])
def test_tpu_kernel_lowers_to_mosaic(m, k, n, bits):
    """Decode shapes (SmolLM2's and Llama-7B's MLP up) and a ragged prefill-like one (partial M and N
    blocks), float32 and bfloat16 x, groups of 64 and of 32 (short groups: many per K step)."""
    for x_dtype, group, scale_dtype in ((jnp.bfloat16, 64, jnp.bfloat16), (jnp.float32, 32, jnp.float32)):
        rows = k if bits == 8 else k // 2
        values = S((rows, n), jnp.int8 if bits == 8 else jnp.uint8)
        assert_lowers_to_mosaic_tpu(
            lambda x, v, s, group=group: quantized_matmul_pallas_tpu(x, QuantizedWeight(v, s, bits, group)),
            S((m, k), x_dtype),
            values,
            S((k // group, n), scale_dtype),
        )


@pytest.mark.parametrize("k, n", [(576, 1536), (4096, 11008)])  # SmolLM2's MLP up, Llama-7B's MLP up
@pytest.mark.parametrize("bits", [4, 8])
def test_tpu_int8_kernel_lowers_to_mosaic(k, n, bits):
    """Decode (m 1) and verification-sized (m 16) int8 rows, groups of 64 and per-channel (one group of all K
    rows)."""
    rows = k if bits == 8 else k // 2
    for m, group, out_dtype in ((1, 64, jnp.float32), (16, k, jnp.bfloat16)):
        qw = QuantizedWeight(
            S((rows, n), jnp.int8 if bits == 8 else jnp.uint8), S((k // group, n), jnp.float32), bits, group
        )
        assert_lowers_to_mosaic_tpu(
            functools.partial(quantized_matmul_int8_pallas_tpu, out_dtype=out_dtype),
            S((m, k), jnp.int8),
            S((), jnp.float32),
            qw,
        )
