"""Shared checks for the Pallas kernel tests (`tests/kernels/`): per-dtype tolerances, the GPU (Triton) and
TPU (Mosaic) lowering checks, the dispatchers' route to the TPU variants, and a naive attention oracle.

Interpret mode fills every output a kernel does not alias with NaN before the call
(`jax._src.pallas.primitives.uninitialized_value`), so `assert_close` failing on non-finite values is
what catches unwritten elements.

`triton_module_text` lowers a function for CUDA on this CPU-only machine: Pallas emits the Triton IR
(as an `__gpu$xla.gpu.triton` custom call) without a GPU, so block shapes and primitives that the
Triton lowering rejects fail here, in CI. Only the final PTX compilation needs a real GPU.

`avx2_cpu_kernels` builds the CPU kernels' plain AVX2 variant once per test run (its tests live in two files).
"""

import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

# The implementation the `test_<op>_gpu.py` tests run the Pallas (Triton) kernels with: the interpreter in CI
# (any CPU), or compiled on a GPU with `SSM_LLM_KERNEL_IMPL=pallas` (what `experiments/gpu_check.sh` does).
IMPL = os.environ.get("SSM_LLM_KERNEL_IMPL", "interpret")
INTERPRET = IMPL == "interpret"

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


def random_prefill_inputs(seed, batch, steps, kv_heads, group, dim, dtype):
    """Prefill attention inputs q [B, T, H_kv * group, D] and k, v [B, T, H_kv, D] in `dtype`, drawn with
    numpy (jax.random would compile for every drawn shape)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, steps, kv_heads * group, dim), np.float32), dtype)
    k, v = (jnp.asarray(rng.standard_normal((batch, steps, kv_heads, dim), np.float32), dtype) for _ in range(2))
    return q, k, v


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


def dispatch_on_tpu(dispatcher, variant: str, *args, impls=("pallas", "auto"), execute: bool = True, **kwargs):
    """With the backend reported as TPU, the jitted `dispatcher(*args, impl=impl, **kwargs)` of each impl
    calls its TPU variant (the function named `variant` in the dispatcher's module, run here in TPU
    interpret mode) exactly once, passing `kwargs["block_sizes"]` (None: absent) through. Returns the
    first impl's output, computed when `execute`, else only traced (a ShapeDtypeStruct tree); the other
    impls are only traced. Static arguments go in `kwargs`, arrays in `args`."""
    module = sys.modules[dispatcher.__module__]
    tpu_kernel = getattr(module, variant)
    passed = []

    def interpreted(*a, **kw):
        passed.append(kw.get("block_sizes"))
        return tpu_kernel(*a, **kw, interpret=True)

    outputs = []
    with mock.patch.object(jax, "default_backend", lambda: "tpu"), mock.patch.object(module, variant, interpreted):
        for impl in impls:
            run = lambda *a, impl=impl: dispatcher(*a, impl=impl, **kwargs)  # noqa: E731
            outputs.append(jax.jit(run)(*args) if execute and not outputs else jax.eval_shape(run, *args))
    assert passed == [kwargs.get("block_sizes")] * len(impls), passed
    return outputs[0]


def naive_attention(q, k, v, q_positions, kv_lengths, window, streaming=None):
    """q: [B, T, H, D]; k, v: [B, H_kv, S, D]; loops over everything in float64. `streaming`: None or per
    sequence (start, sinks, window) lists: from position start on, only the first `sinks` keys and the last
    `window` positions are seen (StreamingLLM)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, steps, heads, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q)
    for b in range(batch):
        for t in range(steps):
            p = q_positions[b][t]
            keys = [s for s in range(k.shape[2]) if s <= p and s < kv_lengths[b] and (window == 0 or s > p - window)]
            if streaming is not None and p >= streaming[0][b]:
                keys = [s for s in keys if s < streaming[1][b] or s > p - streaming[2][b]]
            for h in range(heads):
                kh, vh = k[b, h // group], v[b, h // group]
                scores = np.array([q[b, t, h] @ kh[s] for s in keys]) / np.sqrt(dim)
                w = np.exp(scores - scores.max())
                out[b, t, h] = (w / w.sum()) @ vh[keys]
    return out


def assert_step_close(got, want, state, dtype):
    """A decode step's `(y, new state)` equals the reference's `want`: y within TOL[dtype], the new state
    (in the old state's dtype and shape) within TOL of the state's dtype when bfloat16, and rewritten: not
    equal to the old `state` (an aliased state the kernel failed to write would still hold it)."""
    (y, new), (y_ref, new_ref) = got, want
    assert y.dtype == y_ref.dtype and new.dtype == state.dtype and new.shape == state.shape
    assert_close(y, y_ref, dtype)
    assert_close(new, new_ref, dtype if state.dtype == jnp.float32 else jnp.bfloat16)
    assert not np.array_equal(np.asarray(new, np.float32), np.asarray(state, np.float32))


def random_quantized_weight(rng, k, n, bits, group, scale_dtype=jnp.float32, codes=None):
    """A QuantizedWeight [K, N] of `codes` (default: random over the full range, extremes included) and
    per-group scales ~ 1 / 127, from numpy `rng`."""
    from pallas_kernels.quantized_matmul import CODE_RANGE, QuantizedWeight, pack_int4

    if codes is None:
        low, high = CODE_RANGE[bits]
        codes = rng.integers(low, high + 1, (k, n))
    values = jnp.asarray(codes, jnp.int8) if bits == 8 else pack_int4(jnp.asarray(codes))
    scales = jnp.asarray(rng.uniform(0.5, 1.5, (k // group, n)) / 127, scale_dtype)
    return QuantizedWeight(values, scales, bits, group)


def random_int8_inputs(seed, lead, k, n, bits, group, scale_dtype=jnp.float32):
    """Integer-activation matmul inputs: xq int8 [*lead, K] over the full range, x_scale (float32) so
    outputs are O(1), and a `random_quantized_weight`."""
    rng = np.random.default_rng(seed)
    xq = jnp.asarray(rng.integers(-127, 128, (*lead, k)), jnp.int8)
    x_scale = np.float32(rng.uniform(0.5, 1.5) / (127 * np.sqrt(k)))
    return xq, x_scale, random_quantized_weight(rng, k, n, bits, group, scale_dtype)


def avx2_cpu_kernels():
    """The CPU kernels' library built with the plain AVX2 flags (no VNNI), whatever the host: loaded with
    ctypes. Built once per test run into the run's cache (conftest.py), shared by pytest-xdist's workers
    (the build renames its output into place atomically): ~10 s of compiling on 2 cores."""
    import ctypes
    import hashlib
    from pathlib import Path

    from pallas_kernels import cpu_build as build

    key = "\0".join([*(p.read_text() for p in (*build.SOURCES, *build.HEADERS)), " ".join(build.FLAGS)])
    path = Path(os.environ["SSM_LLM_CACHE"]) / "test_avx2" / f"lib-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        build._compile(build._compiler(), path, flags=build.FLAGS)
    return ctypes.cdll.LoadLibrary(str(path))
