"""The compiled CPU int8 kernel (`pallas_kernels.cpu_int8_dot`) against numpy's int64 products, and W8A8 models
giving the same numbers through it as through XLA's integer dot."""

from __future__ import annotations

import dataclasses
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import avx2_cpu_kernels

import ssm_llm
from pallas_kernels import cpu_build as build
from pallas_kernels import cpu_int8_dot

CAN_BUILD = (
    platform.machine().lower() in ("x86_64", "amd64")
    and {"avx2", "fma"} <= build._cpu_flags()
    and (shutil.which("c++") or shutil.which("g++")) is not None
)
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="an x86-64 AVX2 host with a C++ compiler builds the kernel")


def numpy_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) @ w.astype(np.int64)


@needs_kernel
def test_the_kernel_builds_here_into_the_cache():
    # CI's hosts are x86-64 with AVX2 and g++: the kernel must be there, not silently replaced by XLA's dot.
    assert cpu_int8_dot.unavailable_reason() is None and cpu_int8_dot.available()
    assert list(cpu_int8_dot.kernel_dir().glob("libssm_llm_cpu_kernels-*.so"))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 70), n=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_int8_dot_is_exact_on_any_shape(m, k, n, seed):
    # Column tails past the 32-column blocks, K not a multiple of 4, every weight code (-128 included),
    # activation codes over W8A8's range [-127, 127], the extremes drawn often.
    rng = np.random.default_rng(seed)
    x = rng.choice([-127, 127, 0, *rng.integers(-127, 128, 5)], size=(m, k)).astype(np.int8)
    w = rng.choice([-128, 127, -127, *rng.integers(-128, 128, 5)], size=(k, n)).astype(np.int8)
    got = np.asarray(jax.jit(cpu_int8_dot.int8_dot)(x, w))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, numpy_dot(x, w))
    np.testing.assert_array_equal(got, np.asarray(cpu_int8_dot.int8_dot_reference(x, w)))


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 576, 1536), (2, 1536, 576), (3, 576, 8192 + 40), (1, 4100, 64), (5, 0, 8)])
def test_int8_dot_is_exact_on_model_sized_and_edge_shapes(m, k, n):
    # SmolLM2's products, more columns than one accumulator pass (8192), a long K, and an empty K (zeros).
    rng = np.random.default_rng(m * k + n)
    x = rng.integers(-127, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.int8_dot(x, w)), numpy_dot(x, w))


@needs_kernel
def test_the_avx2_build_is_exact_on_a_vnni_host_too():
    # The library is built for the host (vpdpbusd where it has AVX-512 VNNI); build the plain AVX2 variant as
    # well, so that both code paths are checked wherever this runs.
    target = "ssm_llm_int8_dot_avx2_test"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(avx2_cpu_kernels().SsmLlmInt8Dot), "cpu")
    rng = np.random.default_rng(3)
    for m, k, n in [(1, 576, 200), (2, 70, 33), (3, 9, 5)]:
        x = rng.integers(-127, 128, (m, k), dtype=np.int8)
        w = rng.choice([-128, 127, *rng.integers(-128, 128, 6)], size=(k, n)).astype(np.int8)
        got = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.int32))(x, w)
        np.testing.assert_array_equal(np.asarray(got), numpy_dot(x, w))


@needs_kernel
def test_int8_dot_under_vmap_and_with_no_rows():
    rng = np.random.default_rng(0)
    xs = rng.integers(-127, 128, (3, 2, 40), dtype=np.int8)
    w = rng.integers(-128, 128, (40, 33), dtype=np.int8)
    got = jax.vmap(cpu_int8_dot.int8_dot, in_axes=(0, None))(xs, w)
    np.testing.assert_array_equal(np.asarray(got), np.stack([numpy_dot(x, w) for x in xs]))
    assert cpu_int8_dot.int8_dot(np.zeros((0, 40), np.int8), w).shape == (0, 33)


def test_int8_dot_refuses_bad_operands_by_name(monkeypatch):
    x, w = jnp.zeros((2, 8), jnp.int8), jnp.zeros((8, 4), jnp.int8)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\] expected, got \(2, 8\) and \(9, 4\)"):
        cpu_int8_dot.int8_dot(x, jnp.zeros((9, 4), jnp.int8))
    with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[K, N\\] expected"):
        cpu_int8_dot.int8_dot(x[None], w)
    with pytest.raises(ValueError, match="int8 operands expected, got float32 and int8"):
        cpu_int8_dot.int8_dot(x.astype(jnp.float32), w)
    monkeypatch.setattr(cpu_int8_dot, "unavailable_reason", lambda: "the CPU lacks avx2")
    with pytest.raises(RuntimeError, match="the CPU kernel is unavailable here: the CPU lacks avx2"):
        cpu_int8_dot.int8_dot(x, w)


def test_hosts_that_cannot_build_say_why(monkeypatch):
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    assert build._check_host() == "the kernels are x86-64 AVX2 code; this machine is aarch64"
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse4_2", "fma"})
    assert build._check_host() == "the CPU lacks avx2"
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(build, "_compiler", lambda: None)
    assert build._check_host() == "no C++ compiler found ($CXX, c++ or g++)"


def test_a_failed_build_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "SOURCES", (tmp_path / "broken.cc",))
    (tmp_path / "broken.cc").write_text("this is not C++\n")
    compiler = build._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler on this host")
    with pytest.raises(RuntimeError, match="building the CPU kernels failed"):
        build._compile(compiler, tmp_path / "lib.so")
    assert not list(tmp_path.glob("*.so*"))  # no partial library left behind


CONFIG = ssm_llm.ModelConfig(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    tie_word_embeddings=True,
)  # fmt: skip


@needs_kernel
def test_a_w8a8_model_gives_the_same_numbers_through_the_kernel():
    # Rotated W8A8 with the int8 embedding: every linear and the output projection go through int8_matmul. The
    # other W8A8 tests (tests/quant/) check these models against numpy and their float simulations with the
    # default int8_dot="auto", so through the kernel; here the two dots must agree to the last bit.
    params = ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))
    qparams, kernel = ssm_llm.quantize_weights(params, CONFIG, "w8a8", rotation=True, embedding=True)
    xla = dataclasses.replace(kernel, int8_dot="xla")
    assert kernel.int8_dot == "auto"
    ids = jnp.asarray([[5, 1, 4, 1, 5, 9, 2, 6], [7, 7, 3, 1, 2, 8, 8, 0]])
    results = {}
    for config in (kernel, xla):  # a prefill of 12 rows (XLA's dot either way), then decode steps of 2 rows
        logits, cache = ssm_llm.forward(qparams, config, ids[:, :6], ssm_llm.init_cache(config, 2, 16))
        steps = [logits]
        for t in range(6, ids.shape[1]):
            logits, cache = ssm_llm.forward(qparams, config, ids[:, t : t + 1], cache)
            steps.append(logits)
        results[config.int8_dot] = np.asarray(jnp.concatenate(steps, 1))
    np.testing.assert_array_equal(results["auto"], results["xla"])


def test_config_names_the_int8_dot_choices():
    with pytest.raises(ValueError, match="config.int8_dot must be one of auto, xla, got 'fast'"):
        dataclasses.replace(CONFIG, int8_dot="fast")
