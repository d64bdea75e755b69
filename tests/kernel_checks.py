"""Shared checks for the Pallas kernel tests: per-dtype tolerances and the GPU (Triton) lowering check.

Interpret mode fills every output a kernel does not alias with NaN before the call
(`jax._src.pallas.primitives.uninitialized_value`), so `assert_close` failing on non-finite values is
what catches unwritten elements.

`triton_module_text` lowers a function for CUDA on this CPU-only machine: Pallas emits the Triton IR
(as an `__gpu$xla.gpu.triton` custom call) without a GPU, so block shapes and primitives that the
Triton lowering rejects fail here, in CI. Only the final PTX compilation needs a real GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Tolerances per input dtype: the kernels compute in float32 and round outputs to the input dtype.
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def assert_close(got, want, dtype, scale: float = 1.0):
    """`got` equals `want` within TOL[dtype] * scale (absolute and relative), and is all finite."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "kernel left elements unwritten (NaN) or produced non-finite values"
    tol = TOL[jnp.dtype(dtype)] * scale
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def triton_module_text(fn, *args) -> str:
    """StableHLO of `jax.jit(fn)(*args)` lowered for CUDA (args: arrays or ShapeDtypeStructs)."""
    import jax.experimental.pallas.triton  # noqa: F401  (registers the Triton lowering)

    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def assert_lowers_to_triton(fn, *args, calls: int = 1):
    """`fn` lowers for CUDA into `calls` Triton kernels (and no fallback lowering)."""
    text = triton_module_text(fn, *args)
    assert text.count("__gpu$xla.gpu.triton") == calls, text[:2000]


def assert_lowers_to_mosaic_tpu(fn, *args, calls: int = 1):
    """`fn` lowers for TPU (on this CPU machine) into `calls` Mosaic kernels: block shapes and
    primitives that Mosaic TPU rejects fail here."""
    import jax.experimental.pallas.tpu  # noqa: F401  (registers the Mosaic lowering)

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == calls, text[:2000]


def random_attention_inputs(rng, batch, steps, heads, kv_heads, seq, dim, dtype, quantized):
    """q [B, T, H, D] and a cache k/v [B, H_kv, S, D] from numpy `rng` (jax.random would compile for
    every drawn shape): `dtype` floats, or int8 with per-token scales [B, H_kv, S] when `quantized`.
    Returns (q, k, v, k_scale, v_scale), the scales None for a float cache."""
    q = jnp.asarray(rng.standard_normal((batch, steps, heads, dim)), dtype)
    shape = (batch, kv_heads, seq, dim)
    if not quantized:
        k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
        return q, k, v, None, None
    k, v = (jnp.asarray(rng.integers(-127, 128, shape), jnp.int8) for _ in range(2))
    k_scale, v_scale = (jnp.asarray(rng.uniform(0.002, 0.03, shape[:3]), jnp.float32) for _ in range(2))
    return q, k, v, k_scale, v_scale
