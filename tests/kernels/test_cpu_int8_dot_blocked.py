"""The CPU int8 kernel on weights in its blocked layout (`cpu_int8_dot.int8_dot_blocked`, `BlockedInt8Weight`,
`ssm_llm.int8_blocks`): exact against numpy int64, the layout's round trip, and a W8A8 model giving the same
logits and tokens in both layouts, through the kernel and through XLA's dot."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from kernel_checks import avx2_cpu_kernels

import converters
import ssm_llm
from converters.checkpoint import load_checkpoint
from pallas_kernels import cpu_build as build
from pallas_kernels import cpu_int8_dot
from pallas_kernels.cpu_int8_dot import BlockedInt8Weight
from ssm_llm.int8_blocks import block_int8_weights, has_blocked_weights, unblock_int8_weights
from ssm_llm.models import lm_head
from ssm_llm.param_check import check_params
from ssm_llm.sharding import param_specs

needs_kernel = pytest.mark.skipif(build._check_host() is not None, reason="an x86-64 AVX2 host with a C++ compiler")


def numpy_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) @ w.astype(np.int64)


@settings(max_examples=25, deadline=None)
@given(lead=st.integers(0, 2), k=st.integers(1, 70), n=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_the_blocked_layout_round_trips_and_puts_four_k_of_a_column_in_each_lane(lead, k, n, seed):
    w = np.random.default_rng(seed).integers(-128, 128, (*([3] * lead), k, n), dtype=np.int8)
    blocked = np.asarray(cpu_int8_dot.block_weights(w))
    assert blocked.shape == (*([3] * lead), -(-n // 32), -(-k // 4), 128)
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.unblock_weights(blocked, k, n)), w)
    kk, nn = np.random.default_rng(seed).integers(0, [k, n])  # byte (b, g, 4c + j) = w[4g + j, 32b + c]
    assert blocked[(0,) * lead + (nn // 32, kk // 4, 4 * (nn % 32) + kk % 4)] == w[(0,) * lead + (kk, nn)]


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 70), n=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_int8_dot_blocked_is_exact_on_any_shape(m, k, n, seed):
    # Column tails (N not a multiple of 32), K not a multiple of 4, odd row counts, every weight code.
    rng = np.random.default_rng(seed)
    x = rng.choice([-127, 127, 0, *rng.integers(-127, 128, 5)], size=(m, k)).astype(np.int8)
    w = rng.choice([-128, 127, -127, *rng.integers(-128, 128, 5)], size=(k, n)).astype(np.int8)
    got = np.asarray(jax.jit(cpu_int8_dot.int8_dot_blocked, static_argnums=2)(x, cpu_int8_dot.block_weights(w), n))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, numpy_dot(x, w))


@needs_kernel
@pytest.mark.parametrize(
    "m, k, n",
    # 3-6 rows per pass in 512-bit registers where the CPU has VNNI, split evenly (7: 4 + 3, 9: 5 + 4, 13: 5 + 4 + 4)
    [
        (1, 576, 1536),
        (2, 1536, 576),
        (16, 576, 192),
        (3, 576, 49152),
        (5, 0, 8),
        (7, 64, 49),
        (9, 576, 1536),
        (13, 100, 70),
    ],
)
def test_int8_dot_blocked_is_exact_on_model_sized_and_edge_shapes(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x = rng.integers(-127, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    got = cpu_int8_dot.int8_dot_blocked(x, cpu_int8_dot.block_weights(w), n)
    np.testing.assert_array_equal(np.asarray(got), numpy_dot(x, w))


@needs_kernel
def test_int8_dot_blocked_under_vmap_and_with_no_rows():
    rng = np.random.default_rng(0)
    xs = rng.integers(-127, 128, (3, 2, 40), dtype=np.int8)
    w = rng.integers(-128, 128, (40, 33), dtype=np.int8)
    blocked = cpu_int8_dot.block_weights(w)
    got = jax.vmap(cpu_int8_dot.int8_dot_blocked, in_axes=(0, None, None))(xs, blocked, 33)
    np.testing.assert_array_equal(np.asarray(got), np.stack([numpy_dot(x, w) for x in xs]))
    assert cpu_int8_dot.int8_dot_blocked(np.zeros((0, 40), np.int8), blocked, 33).shape == (0, 33)


def test_int8_dot_blocked_refuses_bad_operands_by_name(monkeypatch):
    x, blocked = jnp.zeros((2, 8), jnp.int8), jnp.zeros((1, 2, 128), jnp.int8)
    with pytest.raises(ValueError, match=r"blocked w \[2, 2, 128\] expected for N=40, got \(2, 8\) and \(1, 2, 128\)"):
        cpu_int8_dot.int8_dot_blocked(x, blocked, 40)
    with pytest.raises(ValueError, match="int8 operands expected, got float32 and int8"):
        cpu_int8_dot.int8_dot_blocked(x.astype(jnp.float32), blocked, 32)
    monkeypatch.setattr(cpu_int8_dot, "unavailable_reason", lambda: "the CPU lacks avx2")
    with pytest.raises(RuntimeError, match="the CPU kernel is unavailable here: the CPU lacks avx2"):
        cpu_int8_dot.int8_dot_blocked(x, blocked, 32)


CONFIG = ssm_llm.ModelConfig(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    tie_word_embeddings=True,
)  # fmt: skip


def quantized(**options):
    params = ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))
    return ssm_llm.quantize_weights(params, CONFIG, "w8a8", **options)


@needs_kernel
@pytest.mark.parametrize("unstack", [False, True], ids=["stacked", "unstacked"])
def test_a_blocked_w8a8_model_gives_the_plain_layouts_numbers(unstack):
    # Rotated W8A8 with the int8 (tied) embedding: every linear, the embedding gather and the output projection
    # read blocked weights. A prefill of 2 x 9 = 18 rows, then decode steps of 2 rows, through the kernel and
    # through XLA's dot (the codes unblocked in the program); the plain layout through XLA's dot as the reference.
    qparams, config = quantized(rotation=True, embedding=True)
    if unstack:
        qparams = ssm_llm.unstack_layers(qparams)
    blocked = block_int8_weights(qparams, config)
    assert isinstance(blocked["embed"], BlockedInt8Weight) and has_blocked_weights(blocked)
    ids = jnp.asarray([[5, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [7, 7, 3, 1, 2, 8, 8, 0, 100, 99, 1, 2]])

    def run(params, config):
        logits, cache = ssm_llm.forward(params, config, ids[:, :9], ssm_llm.init_cache(config, 2, 16))
        steps = [logits]
        for t in range(9, ids.shape[1]):
            logits, cache = ssm_llm.forward(params, config, ids[:, t : t + 1], cache)
            steps.append(logits)
        return np.asarray(jnp.concatenate(steps, 1))

    reference = run(qparams, dataclasses.replace(config, int8_dot="xla"))
    np.testing.assert_array_equal(run(blocked, config), reference)
    if unstack:  # (the rest does not depend on the layer layout)
        return
    np.testing.assert_array_equal(run(blocked, dataclasses.replace(config, int8_dot="xla")), reference)
    gen = ssm_llm.GenerationConfig(max_new_tokens=6)
    tokens = ssm_llm.generate(blocked, config, ids[:, :5], gen).tokens
    assert tokens == ssm_llm.generate(qparams, config, ids[:, :5], gen).tokens


def test_blocking_round_trips_and_refuses_what_it_cannot_hold():
    qparams, config = quantized(embedding=True)
    blocked = block_int8_weights(qparams, config)
    back = unblock_int8_weights(blocked)
    assert jax.tree.structure(back) == jax.tree.structure(qparams) and not has_blocked_weights(back)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(qparams), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check_params(blocked, config)  # the blocked layout passes the shape checks
    w4, config4 = ssm_llm.quantize_weights(ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0)), CONFIG, "w4a16")
    with pytest.raises(ValueError, match="the blocked layout serves W8A8 products.*'w4a16'"):
        block_int8_weights(w4, config4)
    with pytest.raises(ValueError, match="8-bit symmetric QuantizedWeight with one scale per output channel"):
        cpu_int8_dot.to_blocked(w4["layers"]["wq"])
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(ValueError, match=r"params\['embed'\] is in the CPU kernel's blocked layout, which is not"):
        param_specs(blocked, config, mesh)
    one_layer = cpu_int8_dot.to_blocked(jax.tree.map(lambda x: x[0], qparams["layers"]["wq"]))
    with pytest.raises(ValueError, match="a BlockedInt8Weight multiplies int8 activations only"):
        lm_head.linear(jnp.ones((1, 64)), one_layer)


@needs_kernel
@pytest.mark.skipif(
    set(build.VNNI_FLAGS) <= set(build._flags()), reason="this host's own build is the VNNI one (every test runs it)"
)
def test_the_vnni_build_compiles_on_a_host_without_vnni(tmp_path):
    # Its 3-6-row passes in 512-bit registers exist only in the AVX-512 VNNI build; a host without VNNI compiles
    # them here (without running them), so a compile error cannot hide until a VNNI host silently falls back.
    path = tmp_path / "libvnni.so"
    build._compile(build._compiler(), path, flags=build.FLAGS + build.VNNI_FLAGS)
    assert path.stat().st_size > 0


@needs_kernel
def test_the_avx2_build_of_the_blocked_product_is_exact_on_a_vnni_host_too():
    # The host's build takes VNNI's unsigned-activation path where it can; the plain AVX2 one (sign trick, two rows
    # per pass) is built and checked too, so that both run wherever this does.
    target = "ssm_llm_int8_dot_blocked_avx2_test"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(avx2_cpu_kernels().SsmLlmInt8DotBlocked), "cpu")
    rng = np.random.default_rng(3)
    for m, k, n in [(1, 576, 200), (5, 70, 33), (3, 9, 5)]:
        x = rng.choice([-127, 127, *rng.integers(-127, 128, 6)], size=(m, k)).astype(np.int8)
        w = rng.choice([-128, 127, *rng.integers(-128, 128, 6)], size=(k, n)).astype(np.int8)
        out = jax.ShapeDtypeStruct((m, n), jnp.int32)
        got = jax.ffi.ffi_call(target, out)(x, cpu_int8_dot.block_weights(w))
        np.testing.assert_array_equal(np.asarray(got), numpy_dot(x, w))


@needs_kernel
def test_load_gives_w8a8_in_the_blocked_layout_and_checkpoints_keep_the_plain_one(tmp_path):
    model = tiny_hf_model("llama")
    config, params = converters.load(model, quantize="w8a8-rot-emb")
    assert isinstance(params["layers"]["wq"], BlockedInt8Weight) and isinstance(params["embed"], BlockedInt8Weight)
    converters.save(params, config, tmp_path / "ckpt")
    _, stored = load_checkpoint(tmp_path / "ckpt", jnp.float32)
    assert not has_blocked_weights(stored) and stored["layers"]["wq"].bits == 8  # on disk: the plain layout
    config2, params2 = converters.load(tmp_path / "ckpt")
    assert config2 == config and has_blocked_weights(params2)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, weight_only = converters.load(model, quantize="w8a16")  # int8 weights times float activations: plain
    assert not has_blocked_weights(weight_only)
