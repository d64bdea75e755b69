"""The Pallas DFloat11 exponent decoder (interpreted on CPU, compiled under experiments/gpu_check.sh), against the
jnp reference on hypothesis-drawn tensors and lane tiles (ragged last tiles included); and its Triton lowering
for CUDA on a SmolLM2-sized weight (checked from this CPU machine)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, assert_lowers_to_triton

from pallas_kernels.dfloat11 import (
    DFloat11BlockSizes,
    decode_exponents_pallas,
    decode_exponents_ref,
    decompress,
    decompress_tree,
)
from ssm_llm.compress.dfloat11 import encode, encode_stack


@settings(max_examples=10, deadline=None)
@given(
    size=st.integers(1, 3000),
    block=st.sampled_from([1, 16, 256]),
    lanes=st.sampled_from([None, DFloat11BlockSizes(block_lanes=4), DFloat11BlockSizes(block_lanes=32)]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_reference(size, block, lanes, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((size,)) * 0.05).astype(jnp.bfloat16).reshape(1, size)
    w = jax.tree_util.tree_map(jnp.asarray, encode(x, block=block))
    base = jnp.zeros(w.block_starts.shape, jnp.int32)
    want = decode_exponents_ref(w.stream, w.block_starts, w.table, base, w.code_bits, block)
    got = decode_exponents_pallas(
        w.stream, w.block_starts, w.table, base, w.code_bits, block, block_sizes=lanes, interpret=IMPL == "interpret"
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the whole tensor through the dispatcher: the very bits encoded
    np.testing.assert_array_equal(np.asarray(decompress(w, impl=IMPL)).view(np.uint16), x.view(np.uint16))


def test_tensors_with_different_codes_decode_together():
    """Several tables side by side (non-zero table bases) and a stacked weight, through the dispatcher."""
    rng = np.random.default_rng(0)
    xs = {
        "a": (rng.standard_normal((70, 33)) * 0.02).astype(jnp.bfloat16),
        "b": rng.integers(0, 1 << 16, (5, 300), dtype=np.uint16).view(jnp.bfloat16),
        "c": (rng.standard_normal((3, 20, 9)) * 3).astype(jnp.bfloat16),
    }
    tree = {
        "a": jax.tree_util.tree_map(jnp.asarray, encode(xs["a"], block=16)),
        "b": jax.tree_util.tree_map(jnp.asarray, encode(xs["b"], block=16)),
        "c": jax.tree_util.tree_map(jnp.asarray, encode_stack(xs["c"], block=16)),
    }
    out = decompress_tree(tree, impl=IMPL, block_sizes=DFloat11BlockSizes(block_lanes=8))
    for name, x in xs.items():
        np.testing.assert_array_equal(np.asarray(out[name]).view(np.uint16), x.view(np.uint16))


def test_lowers_to_triton():
    layer = {name: np.zeros((576, 1536), jnp.bfloat16) for name in ("w_gate", "w_up")}
    tree = {k: jax.tree_util.tree_map(jnp.asarray, encode(v)) for k, v in layer.items()}
    w = tree["w_gate"]
    base = jnp.zeros(w.block_starts.shape, jnp.int32)
    assert_lowers_to_triton(
        lambda s, b, t, z: decode_exponents_pallas(s, b, t, z, w.code_bits, w.block),
        w.stream,
        w.block_starts,
        w.table,
        base,
    )
