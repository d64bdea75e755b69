"""DFloat11's format and jnp decoder: encode -> decode gives back the very bfloat16 bits (hypothesis-drawn
tensors of random bit patterns: NaNs, infinities, subnormals and signed zeros included), the length-limited
code is a prefix code no longer than asked and as short as Huffman's when the limit does not bind, partial
row decoding equals the whole tensor's rows, several tensors decode together, and bad layouts are refused."""

import heapq

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.dfloat11 import DFloat11Weight, check_weight, decompress, decompress_tree, take_rows
from ssm_llm.compress.dfloat11 import canonical_codes, code_lengths, encode, encode_stack


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


def _weights_like(rng, shape, kind: str) -> np.ndarray:
    """bfloat16 weights: "normal" (a trained layer's few exponents) or "bits" (any 16-bit pattern)."""
    if kind == "bits":
        return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(jnp.bfloat16)
    return (rng.standard_normal(shape) * 0.02).astype(jnp.bfloat16)


def _device(w: DFloat11Weight) -> DFloat11Weight:
    return jax.tree_util.tree_map(jnp.asarray, w)


@settings(max_examples=15, deadline=None)  # 25.4 s at 25 examples in CI (2-core host): CI time
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    block=st.sampled_from([1, 3, 64, 256]),
    code_bits=st.sampled_from([8, 12, 25]),
    kind=st.sampled_from(["normal", "bits"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_bit_exact(rows, cols, block, code_bits, kind, seed):
    x = _weights_like(np.random.default_rng(seed), (rows, cols), kind)
    w = _device(encode(x, block=block, code_bits=code_bits))
    check_weight(w, "drawn")
    assert w.shape == x.shape and w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(decompress(w, impl="xla")), _bits(x))
    picked = np.random.default_rng(seed).integers(0, rows, size=(2, 3))
    np.testing.assert_array_equal(_bits(take_rows(w, jnp.asarray(picked), impl="xla")), _bits(x[picked]))


def test_special_values_survive():
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.0e38, 1.0, -2.5], np.float32)
    x = values.astype(jnp.bfloat16).reshape(2, 5)
    np.testing.assert_array_equal(_bits(decompress(_device(encode(x, block=3)), impl="xla")), _bits(x))


def test_one_exponent_and_one_weight():
    for x in (np.full((4, 4), 0.5, jnp.bfloat16), np.array([[1.5]], jnp.bfloat16)):
        np.testing.assert_array_equal(_bits(decompress(_device(encode(x)), impl="xla")), _bits(x))


def _huffman(counts) -> tuple[int, int]:
    """(total bits, longest code) of an unlimited Huffman code: the sum of the merged weights, the root's depth."""
    heap = [(int(c), 0) for c in counts if c]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        (a, da), (b, db) = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, (a + b, max(da, db) + 1))
    return cost, heap[0][1]


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 10**6), min_size=2, max_size=60), max_bits=st.integers(6, 25))
def test_code_lengths_are_a_limited_optimal_prefix_code(counts, max_bits):
    counts = np.array(counts + [0] * (256 - len(counts)))
    used = np.count_nonzero(counts)
    if used > 1 << max_bits or used < 2:
        return
    lengths = code_lengths(counts, max_bits)
    assert (lengths[counts == 0] == 0).all() and (lengths[counts > 0] >= 1).all()
    assert lengths.max() <= max_bits
    assert np.sum(2.0 ** -lengths[lengths > 0]) <= 1.0  # Kraft: a prefix code exists
    cost = int((lengths * counts).sum())
    huffman_cost, huffman_longest = _huffman(counts)
    assert cost >= huffman_cost
    if huffman_longest <= max_bits:  # the limit does not bind: optimal means Huffman's cost
        assert cost == huffman_cost
    codes = canonical_codes(lengths)
    words = {format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths)}
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_tensors_decode_together():
    rng = np.random.default_rng(0)
    xs = {"a": _weights_like(rng, (3, 7, 9), "normal"), "b": _weights_like(rng, (5, 11), "bits")}
    stacked = encode_stack(xs["a"], block=4)
    tree = {"a": _device(stacked), "b": _device(encode(xs["b"], block=4)), "c": jnp.ones(3)}
    out = decompress_tree(tree, impl="xla")
    np.testing.assert_array_equal(_bits(out["a"]), _bits(xs["a"]))
    np.testing.assert_array_equal(_bits(out["b"]), _bits(xs["b"]))
    np.testing.assert_array_equal(np.asarray(out["c"]), np.ones(3))
    # layer slices of the stack, as the scan over layers sees them
    for i in range(3):
        one = jax.tree_util.tree_map(lambda a, i=i: a[i], tree["a"])
        np.testing.assert_array_equal(_bits(decompress(one, impl="xla")), _bits(xs["a"][i]))


def test_bad_inputs_are_refused():
    x = np.ones((4, 4), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        encode(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="block"):
        encode(x, block=0)
    with pytest.raises(ValueError, match="code_bits"):
        encode(x, code_bits=26)
    w = _device(encode(x))
    with pytest.raises(ValueError, match="table"):
        check_weight(DFloat11Weight(w.sign_mantissa, w.stream, w.block_starts, w.table[:5], w.block, w.code_bits), "w")
    with pytest.raises(ValueError, match="stream must be uint32"):
        check_weight(DFloat11Weight(w.sign_mantissa, w.stream.astype(jnp.int32), w.block_starts, w.table, 256, 12), "w")
    with pytest.raises(ValueError, match="2-D"):
        take_rows(_device(encode(np.ones((2, 2, 2), jnp.bfloat16))), jnp.array([0]))
