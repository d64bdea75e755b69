"""W8A8 weights in the CPU kernel's blocked layout, and back (`pallas_kernels.cpu_int8_dot.BlockedInt8Weight`).

The plain layout (`QuantizedWeight` codes [K, N]) is what quantization, checkpoints and sharding use; the
blocked one is how decode on a CPU reads them fastest: each 32-column block of a weight is one contiguous
stream for `cpu_int8_dot.int8_dot_blocked`. `converters.load` returns it where the kernel runs (a CPU with AVX2
and a C++ compiler, one process, no mesh); `block_int8_weights` converts any W8A8 model, `unblock_int8_weights`
turns it back. Both layouts give the same int32 sums, hence the same tokens.
"""

from __future__ import annotations

import jax

from pallas_kernels import cpu_int8_dot
from pallas_kernels.cpu_int8_dot import BlockedInt8Weight, blockable, to_blocked, to_plain


def _is_weight(x) -> bool:
    return isinstance(x, BlockedInt8Weight) or blockable(x)


def block_int8_weights(params: dict, config) -> dict:
    """A copy of a W8A8 attention model's `params` (`config.quantization == "w8a8"`) with every 8-bit
    per-channel weight (the linear layers; the int8 embedding / output projection) in the blocked layout."""
    if getattr(config, "quantization", None) != "w8a8":
        raise ValueError(
            "block_int8_weights: the blocked layout serves W8A8 products (int8 activations); config.quantization "
            f"is {getattr(config, 'quantization', type(config).__name__)!r}"
        )

    def block(x):
        return to_blocked(x) if blockable(x) else x

    return jax.tree_util.tree_map(block, params, is_leaf=_is_weight)


def for_cpu_kernel(params: dict, config) -> dict:
    """`params` blocked (`block_int8_weights`) where decode reads them through the CPU kernel: a W8A8 attention
    model (`config.quantization == "w8a8"`, `config.int8_dot` "auto") on a CPU backend in one process, with the
    kernel built here; else `params` as they are."""
    applies = (
        getattr(config, "quantization", None) == "w8a8"
        and getattr(config, "int8_dot", None) == "auto"
        and jax.default_backend() == "cpu"
        and jax.process_count() == 1
        and cpu_int8_dot.available()
    )
    return block_int8_weights(params, config) if applies else params


def unblock_int8_weights(params: dict) -> dict:
    """A copy of `params` with every `BlockedInt8Weight` back in the plain `QuantizedWeight` layout."""

    def plain(x):
        return to_plain(x) if isinstance(x, BlockedInt8Weight) else x

    return jax.tree_util.tree_map(plain, params, is_leaf=_is_weight)


def has_blocked_weights(params) -> bool:
    """Whether any weight in `params` is in the blocked layout."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, BlockedInt8Weight))
    return any(isinstance(x, BlockedInt8Weight) for x in leaves)
