"""KV-cache compression (issue 5): policies that transform the attention cache. So far: the
group-wise quantizers that the storage methods (KIVI, RotateKV, mixed precision, GEAR) build on,
and `cache_bytes`, which measures what a (compressed) cache really holds."""

from ssm_llm.kv.quantization import (BITS, QuantizedTensor, cache_bytes, dequantize, pack_codes, quantize,
                                     quantize_keys, quantize_values, unpack_codes)

__all__ = ["BITS", "QuantizedTensor", "cache_bytes", "dequantize", "pack_codes", "quantize", "quantize_keys",
           "quantize_values", "unpack_codes"]
