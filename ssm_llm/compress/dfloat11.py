"""DFloat11's encoder (host side, numpy): a length-limited canonical Huffman code of each tensor's bfloat16
exponents, and `dfloat11(params)`, which stores a model's bfloat16 matrices in that form.

The decoder (`pallas_kernels.dfloat11`) runs inside the jitted forward: each layer's weights are decoded as
the layer starts (`ssm_llm.layer_layout.run_layers`), the embedding's rows as they are looked up and the
whole output head before the logits. The outputs are bit for bit the uncompressed model's.
"""

from __future__ import annotations

import heapq

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dfloat11 import MAX_CODE_BITS, DFloat11Weight, is_dfloat11
from pallas_kernels.quantized_matmul import QuantizedWeight
from ssm_llm.bitstack_weight import BitStackWeight

DEFAULT_BLOCK = 256  # elements per independently decodable block: 32 bits of start per block, 0.125 bit per weight
DEFAULT_CODE_BITS = 12  # longest code: a 4096-entry table; on SmolLM2's exponents 2.692 bits per weight against
# 2.690 for an unlimited Huffman code (10 bits: 2.700; the entropy: 2.656)


def code_lengths(counts: np.ndarray, max_bits: int) -> np.ndarray:
    """Optimal prefix-code lengths for symbol `counts` [256] with no code longer than `max_bits` (package-merge,
    Larmore and Hirschberg); unused symbols get 0, a lone symbol 1."""
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), np.int64)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    if len(used) > 1 << max_bits:
        raise ValueError(f"{len(used)} symbols cannot have codes of at most {max_bits} bits")
    # Each item: (weight, tie-break, per-symbol counts of how often it was packaged).
    leaves = sorted((int(counts[s]), i, np.eye(1, len(used), i, dtype=np.int64)[0]) for i, s in enumerate(used))
    level = leaves
    for _ in range(max_bits - 1):
        packages = [(a[0] + b[0], min(a[1], b[1]), a[2] + b[2]) for a, b in zip(level[0::2], level[1::2], strict=False)]
        level = list(heapq.merge(leaves, packages, key=lambda item: (item[0], item[1])))
    chosen = sum(item[2] for item in level[: 2 * len(used) - 2])
    lengths[used] = chosen
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (by length, then symbol) for `lengths` [256] (0: unused)."""
    codes = np.zeros(len(lengths), np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol], previous = code, int(lengths[symbol])
        code += 1
    return codes


def _table(codes: np.ndarray, lengths: np.ndarray, code_bits: int) -> np.ndarray:
    table = np.zeros(1 << code_bits, np.uint16)
    for symbol in np.flatnonzero(lengths):
        shift = code_bits - int(lengths[symbol])
        table[int(codes[symbol]) << shift : (int(codes[symbol]) + 1) << shift] = (int(lengths[symbol]) << 8) | symbol
    return table


def _pack(codes: np.ndarray, lengths: np.ndarray, starts: np.ndarray, words: int) -> np.ndarray:
    """The codes as a uint32 stream, most significant bit first (a code spans at most two words). Each word is
    the sum of disjoint bit fields, exact in float64 below 2 ** 53."""
    word, offset = starts >> 5, starts & 31
    end = offset + lengths
    head = np.where(end <= 32, codes << np.maximum(32 - end, 0), codes >> np.maximum(end - 32, 0))
    tail = np.where(end > 32, (codes << np.maximum(64 - end, 0)) & 0xFFFFFFFF, 0)
    out = np.bincount(word, weights=head.astype(np.float64), minlength=words)
    out[: words - 1] += np.bincount(word + 1, weights=tail.astype(np.float64), minlength=words)[: words - 1]
    return out.astype(np.uint32)


def encode(values, block: int = DEFAULT_BLOCK, code_bits: int = DEFAULT_CODE_BITS) -> DFloat11Weight:
    """One bfloat16 tensor (no stacked axes) -> its `DFloat11Weight` (numpy arrays; `jnp.asarray` them or let
    `dfloat11` do it)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"dfloat11: block must be a positive int, got {block!r}")
    if isinstance(code_bits, bool) or not isinstance(code_bits, int) or not 8 <= code_bits <= MAX_CODE_BITS:
        raise ValueError(f"dfloat11: code_bits must be an int in [8, {MAX_CODE_BITS}], got {code_bits!r}")
    values = np.asarray(values)
    if values.dtype != jnp.bfloat16:
        raise ValueError(
            f"dfloat11 compresses bfloat16 weights losslessly, got {values.dtype}: cast the params to bfloat16 "
            "first (jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)), which is where the loss would be"
        )
    bits = values.view(np.uint16).reshape(-1)
    exponents = ((bits >> 7) & 0xFF).astype(np.int64)
    lengths = code_lengths(np.bincount(exponents, minlength=256), code_bits)
    codes = canonical_codes(lengths)
    element_lengths = lengths[exponents]
    starts = np.concatenate([[0], np.cumsum(element_lengths)[:-1]]) if bits.size else np.zeros(0, np.int64)
    total = int(element_lengths.sum())
    if total >= 2**31 - 64:
        raise ValueError(f"dfloat11: a tensor of {bits.size} weights needs {total} bits, past int32 positions")
    words = total // 32 + 2  # one word of zeros past the end: a step reads two words
    return DFloat11Weight(
        sign_mantissa=(((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8).reshape(values.shape),
        stream=_pack(codes[exponents], element_lengths, starts, words),
        block_starts=starts[::block].astype(np.int32),
        table=_table(codes, lengths, code_bits),
        block=block,
        code_bits=code_bits,
    )


def encode_stack(values, block: int = DEFAULT_BLOCK, code_bits: int = DEFAULT_CODE_BITS) -> DFloat11Weight:
    """A [L, ...] stack of bfloat16 tensors (a model's layers) -> one `DFloat11Weight` with a leading axis L, each
    tensor with its own code; streams zero padded to the longest."""
    parts = [encode(v, block, code_bits) for v in values]
    words = max(p.stream.shape[0] for p in parts)
    stream = np.stack([np.pad(p.stream, (0, words - p.stream.shape[0])) for p in parts])
    stack = lambda name: np.stack([getattr(p, name) for p in parts])  # noqa: E731
    return DFloat11Weight(stack("sign_mantissa"), stream, stack("block_starts"), stack("table"), block, code_bits)


def dfloat11(params: dict, block: int = DEFAULT_BLOCK, code_bits: int = DEFAULT_CODE_BITS, min_size: int = 1 << 16):
    """`params` with every bfloat16 matrix of at least `min_size` weights (per layer) stored as a
    `DFloat11Weight`: the layers' linear weights, the embedding and an untied output head; norms, biases and
    smaller tensors stay as they are (each tensor carries a 2 ** code_bits entry table, 8 KiB at 12 bits: at most
    1 bit per weight at the default 65536 weights, 0.07 bit on SmolLM2's smallest matrix); integer-quantized
    weights (`QuantizedWeight`) stay as they are too. Stacked layers keep their leading
    axis (one code per layer and tensor). The result runs through `forward` / `generate` unchanged, with
    identical outputs.

    Raises ValueError for float weights that are not bfloat16 (lossless means lossless of bfloat16: cast
    first) and when nothing is left to compress."""
    found = []

    def convert(path, leaf, stacked: bool):
        if _kept_whole(leaf) or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        inner = leaf.shape[1:] if stacked else leaf.shape
        if len(inner) < 2 or int(np.prod(inner)) < min_size:
            return leaf
        if leaf.dtype != jnp.bfloat16:
            raise ValueError(
                f"dfloat11: {jax.tree_util.keystr(path)} is {leaf.dtype}; DFloat11 stores bfloat16 weights "
                "losslessly: cast the params to bfloat16 first (jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))"
            )
        host = np.asarray(leaf)
        packed = encode_stack(host, block, code_bits) if stacked else encode(host, block, code_bits)
        found.append(jax.tree_util.keystr(path))
        return jax.tree_util.tree_map(jnp.asarray, packed)

    out = {}
    for key, value in params.items():
        stacked = key == "layers" and isinstance(value, dict)  # [L, ...] leaves: one code per layer
        out[key] = jax.tree_util.tree_map_with_path(
            lambda p, x, s=stacked: convert(p, x, s), value, is_leaf=_kept_whole
        )
    if not found:
        raise ValueError(f"dfloat11: no bfloat16 matrix of at least {min_size} weights to compress in params")
    return out


def _kept_whole(x) -> bool:
    """Leaves `dfloat11` does not walk into: compressed weights (DFloat11, packed BitStack blocks), and
    integer-quantized ones (kept as they are)."""
    return is_dfloat11(x) or isinstance(x, (QuantizedWeight, BitStackWeight))


def compressed_bytes(params) -> tuple[int, int]:
    """(bytes of `params` as stored, bytes of the same weights in bfloat16 / their own dtype)."""
    stored = original = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_dfloat11):
        if is_dfloat11(leaf):
            stored += sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(leaf))
            original += int(np.prod(leaf.shape)) * 2
        else:
            stored += leaf.nbytes
            original += leaf.nbytes
    return stored, original
