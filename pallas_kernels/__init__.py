"""Kernels for the hot loops: a pure-jnp reference beside each Pallas kernel, and a dispatcher.

Every module `pallas_kernels/<name>.py` holds `<name>_ref` (the reference) and `<name>(..., impl)`;
models call only the dispatchers.
"""

from pallas_kernels.cache_attention import cache_attention, cache_attention_ref
from pallas_kernels.dispatch import IMPLS, resolve_impl
from pallas_kernels.flash_attention import flash_attention, flash_attention_ref
from pallas_kernels.quantized_matmul import (QuantizedWeight, dequantize_weights, quantize_weights,
                                             quantized_matmul, quantized_matmul_ref)
from pallas_kernels.tree_attention import tree_attention, tree_attention_ref

__all__ = ["IMPLS", "QuantizedWeight", "cache_attention", "cache_attention_ref", "dequantize_weights",
           "flash_attention", "flash_attention_ref", "quantize_weights", "quantized_matmul", "quantized_matmul_ref",
           "resolve_impl", "tree_attention", "tree_attention_ref"]
