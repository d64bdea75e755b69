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
