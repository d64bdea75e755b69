"""The CPU Walsh-Hadamard kernel (`pallas_kernels.cpu_fwht`): bit-identical to the jnp butterflies
(`ssm_llm.hadamard.fwht_reference`) on hypothesis-drawn shapes and values (infinities and NaN included), under
`vmap` and `grad`; `ssm_llm.hadamard` takes it on one CPU device; clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ssm_llm.hadamard as hadamard
from pallas_kernels import cpu_build as build
from pallas_kernels import cpu_fwht

pytestmark = pytest.mark.skipif(build._check_host() is not None, reason="an x86-64 AVX2 host with a C++ compiler")


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN equals NaN here; -0.0 equals 0.0


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    log_block=st.integers(0, 10),
    blocks=st.integers(1, 3),
    special=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_is_bit_identical_to_the_butterflies(lead, log_block, blocks, special, seed):
    block = 2**log_block
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, blocks * block)) * rng.choice([1e-3, 1.0, 1e4])).astype(np.float32)
    if special:
        x.reshape(-1)[rng.integers(0, x.size, 3)] = rng.choice([np.inf, -np.inf, np.nan, 3e38, -0.0], 3)
    got = jax.jit(cpu_fwht.block_fwht, static_argnums=1)(jnp.asarray(x), block)
    expected = jax.jit(hadamard.fwht_reference)(jnp.asarray(x).reshape(*lead, blocks, block)).reshape(x.shape)
    _same(got, expected)


@pytest.mark.parametrize("log_block", range(11))
def test_every_block_size_is_bit_identical(log_block):
    """Each of the kernel's paths (scalar under 8; registers only at 8; two-stage passes ending in a one-stage or a
    two-stage pass) on values with infinities, NaN, -0 and near-overflow ones, compared as bits."""
    block = 2**log_block
    rng = np.random.default_rng(log_block)
    x = (rng.standard_normal((3, 2 * block)) * 1e3).astype(np.float32)
    x.reshape(-1)[:5] = [np.inf, -np.inf, -0.0, 3e38, -3e38]
    x[2, -1] = np.nan
    got = np.asarray(cpu_fwht.block_fwht(jnp.asarray(x), block))
    expected = np.asarray(hadamard.fwht_reference(jnp.asarray(x).reshape(3, 2, block))).reshape(x.shape)
    finite = ~np.isnan(expected)
    assert (np.isnan(got) == ~finite).all()
    assert (got[finite].view(np.uint32) == expected[finite].view(np.uint32)).all()


def test_hadamard_takes_the_kernel_on_one_cpu_device(monkeypatch):
    assert cpu_fwht.runs_here() == (jax.default_backend() == "cpu" and jax.device_count() == 1)
    calls = []
    kernel = cpu_fwht.block_fwht
    monkeypatch.setattr(cpu_fwht, "block_fwht", lambda x, block: calls.append(block) or kernel(x, block))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 576)), jnp.float32)
    got = hadamard.block_hadamard(x)  # blocks of 64
    assert calls == [64]
    _same(got, hadamard.fwht_reference(x.reshape(3, 9, 64)).reshape(3, 576))
    _same(hadamard.fwht(x[:, :1]), x[:, :1])  # n = 1: the identity, no call
    assert calls == [64]
    monkeypatch.setattr(cpu_fwht, "runs_here", lambda: False)
    _same(hadamard.block_hadamard(x), got)
    assert calls == [64]


def test_vmap_and_grad():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 2, 32)), jnp.float32)
    _same(jax.vmap(lambda r: cpu_fwht.block_fwht(r, 16))(x), cpu_fwht.block_fwht(x, 16))
    weights = jnp.arange(64.0).reshape(2, 32)
    grad = jax.grad(lambda r: (cpu_fwht.block_fwht(r, 32) * weights).sum())(x[0])
    expected = jax.grad(lambda r: (hadamard.fwht_reference(r) * weights).sum())(x[0])
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6, atol=1e-5)


def test_clear_errors(monkeypatch):
    x = jnp.ones((2, 12), jnp.float32)
    with pytest.raises(ValueError, match="power-of-two block"):
        cpu_fwht.block_fwht(x, 3)
    with pytest.raises(ValueError, match="power-of-two block"):
        cpu_fwht.block_fwht(x, 8)  # does not divide 12
    with pytest.raises(ValueError, match="float32 x expected"):
        cpu_fwht.block_fwht(x.astype(jnp.bfloat16), 4)
    with pytest.raises(ValueError, match="power-of-two length"):
        hadamard.fwht(x)
    monkeypatch.setattr(cpu_fwht, "unavailable_reason", lambda: "no compiler")
    with pytest.raises(RuntimeError, match="unavailable here: no compiler"):
        cpu_fwht.block_fwht(x, 4)
