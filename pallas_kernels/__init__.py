"""Kernels for the hot loops: a pure-jnp reference beside each Pallas kernel, and a dispatcher.

Each operation `<name>` has `<name>_ref` (the reference), its Pallas kernels (`<name>_pallas` for the
Triton GPU lowering, `<name>_pallas_tpu` for Mosaic TPU), their tunables as frozen `...BlockSizes`
dataclasses, and the dispatcher `<name>(..., block_sizes=None, impl="auto")`; models call only the
dispatchers. Small operations are one module (`flash_attention.py`, `tree_attention.py`); the others
are packages `<name>/` with `reference.py`, `triton.py` and `tpu.py`, their `__init__` holding the
dispatchers and re-exporting the public names. `cpu_int8_dot/` is the one compiled CPU kernel (C++ through XLA's
FFI, built on first use): the few-row int8 products of W8A8 decode, beside XLA's dot as its reference.
"""

from pallas_kernels.cache_attention import cache_attention, cache_attention_ref
from pallas_kernels.dispatch import IMPLS, resolve_impl
from pallas_kernels.flash_attention import flash_attention, flash_attention_ref
from pallas_kernels.quantized_matmul import (
    QuantizedWeight,
    dequantize_weights,
    quantize_weights,
    quantized_matmul,
    quantized_matmul_ref,
)
from pallas_kernels.tree_attention import tree_attention, tree_attention_ref

__all__ = [
    "IMPLS",
    "QuantizedWeight",
    "cache_attention",
    "cache_attention_ref",
    "dequantize_weights",
    "flash_attention",
    "flash_attention_ref",
    "quantize_weights",
    "quantized_matmul",
    "quantized_matmul_ref",
    "resolve_impl",
    "tree_attention",
    "tree_attention_ref",
]
