"""TPU (Mosaic) variant of the weight-only quantized matmul: TPU interpret mode against the reference on
hypothesis-drawn ragged shapes, bits, group sizes and dtypes (with small block caps, so partial M / N
blocks and several K steps occur), the dispatcher's route to it on TPU under jit, clear errors, and the
Mosaic lowering on decode shapes (no TPU needed for either).
"""

import importlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu

from pallas_kernels.quantized_matmul import (QuantizedWeight, pack_int4, quantize_weights, quantized_matmul,
                                             quantized_matmul_pallas_tpu, quantized_matmul_ref)
from pallas_kernels.tpu_params import QUANTIZED_MATMUL_TPU

qmm = importlib.import_module("pallas_kernels.quantized_matmul")  # the package exports a function of that name

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
S = jax.ShapeDtypeStruct
# Small caps: 16 rows, 128 columns and 64 rows of K per step make tiny shapes take several blocks.
SMALL_BLOCKS = dict(block_m=16, block_n=128, block_k=64)


def _inputs(seed, lead, k, n, dtype, bits, group, scale_dtype):
    """x [*lead, K] scaled so outputs are O(1); w [K, N] standard normal, quantized (numpy draws: eager
    jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, k), np.float32) / np.sqrt(k), dtype)
    return x, quantize_weights(jnp.asarray(rng.standard_normal((k, n), np.float32)), bits, group, scale_dtype)


@settings(max_examples=4, deadline=None)
@given(bits=st.sampled_from([4, 8]), m=st.sampled_from([1, 5, 19]), group=st.sampled_from([2, 16, 32, 48]),
       groups=st.integers(1, 3), n=st.sampled_from([1, 24, 130]), dtype=DTYPES, scale_dtype=DTYPES,
       small=st.booleans(), seed=st.integers(0, 2**16))
def test_tpu_kernel_matches_reference(bits, m, group, groups, n, dtype, scale_dtype, small, seed):
    x, qw = _inputs(seed, (m,), group * groups, n, dtype, bits, group, scale_dtype)
    with mock.patch.dict(QUANTIZED_MATMUL_TPU, SMALL_BLOCKS if small else {}):
        got = quantized_matmul_pallas_tpu(x, qw, interpret=True)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close(got, quantized_matmul_ref(x, qw), dtype)


def test_tpu_kernel_unpacks_int4_extremes_across_k_steps():
    """Both nibbles hit -8 and 7; two groups of 64 rows with 64-row K steps: the accumulator carries."""
    q = jnp.array([[-8, 7, 0, -1], [7, -8, 1, 0]] * 64, jnp.int32)  # [128, 4]
    qw = QuantizedWeight(pack_int4(q), jnp.array([[1.0] * 4, [2.0] * 4], jnp.float32), bits=4, group_size=64)
    picked = np.array([0, 1, 64, 127])  # rows 0 and 1 of group 0 (scale 1), 64 and 127 of group 1 (scale 2)
    with mock.patch.dict(QUANTIZED_MATMUL_TPU, SMALL_BLOCKS):
        got = quantized_matmul_pallas_tpu(jnp.eye(128, dtype=jnp.float32)[picked], qw, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(q)[picked] * np.array([[1], [1], [2], [2]]))


def test_tpu_dispatch_under_jit():
    """With the backend reported as TPU, the jitted dispatcher with impl="pallas" routes to the TPU
    variant (here interpreted) for leading dims [2, 3], even for a group size the GPU kernel rejects."""
    x, qw = _inputs(1, (2, 3), 96, 40, jnp.bfloat16, 4, 16, jnp.float32)
    calls = []

    def interpreted(*a):
        calls.append(1)
        return quantized_matmul_pallas_tpu(*a, interpret=True)

    with (mock.patch.object(jax, "default_backend", lambda: "tpu"),
          mock.patch.object(qmm, "quantized_matmul_pallas_tpu", interpreted)):
        got = jax.jit(lambda x, qw: quantized_matmul(x, qw, impl="pallas"))(x, qw)
    assert calls == [1] and got.shape == (2, 3, 40)
    assert_close(got, quantized_matmul_ref(x, qw), jnp.bfloat16)


def test_tpu_kernel_rejects_bad_input():
    qw = quantize_weights(jnp.ones((64, 8)), 8, 32)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 64\]"):
        quantized_matmul_pallas_tpu(jnp.ones((2, 32)), qw, interpret=True)
    with pytest.raises(ValueError, match="x must be floating point"):
        quantized_matmul_pallas_tpu(jnp.ones((2, 64), jnp.int32), qw, interpret=True)
    with pytest.raises(ValueError, match="4-bit values must be uint8"):
        quantized_matmul_pallas_tpu(jnp.ones((2, 64)), QuantizedWeight(qw.values[:32], qw.scales, 4, 32),
                                    interpret=True)


@pytest.mark.parametrize("m, k, n", [(1, 576, 1536), (8, 4096, 11008), (300, 4096, 1000)])
@pytest.mark.parametrize("bits", [4, 8])
def test_tpu_kernel_lowers_to_mosaic(m, k, n, bits):
    """Decode shapes (SmolLM2's and Llama-7B's MLP up) and a ragged prefill-like one (partial M and N
    blocks), float32 and bfloat16 x, groups of 64 and of 32 (short groups: many per K step)."""
    for x_dtype, group, scale_dtype in ((jnp.bfloat16, 64, jnp.bfloat16), (jnp.float32, 32, jnp.float32)):
        rows = k if bits == 8 else k // 2
        values = S((rows, n), jnp.int8 if bits == 8 else jnp.uint8)
        assert_lowers_to_mosaic_tpu(
            lambda x, v, s: quantized_matmul_pallas_tpu(x, QuantizedWeight(v, s, bits, group)),
            S((m, k), x_dtype), values, S((k // group, n), scale_dtype))
