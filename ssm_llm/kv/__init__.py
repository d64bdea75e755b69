"""KV-cache compression: policies that transform the attention cache, composable with `generate` through
`GenerationConfig(kv_compression=...)` (a policy implements `ssm_llm.compressed_cache.KVPolicy`), plus
the group-wise quantizers the storage methods build on and `cache_bytes`, which measures what a
(compressed) cache really holds. Also MInference, a sparse prefill (`GenerationConfig(sparse_prefill=...)`)."""

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.gear import GEAR
from ssm_llm.kv.infllm import InfLLM, InfLLMCache
from ssm_llm.kv.kivi import KIVI
from ssm_llm.kv.minference import MInference
from ssm_llm.kv.minicache import MiniCache
from ssm_llm.kv.mixed_precision import MixedPrecisionKV
from ssm_llm.kv.policy import CompressedCache, KVPolicy, PrefillObservation, compress_cache, describe
from ssm_llm.kv.prefill import prefill
from ssm_llm.kv.quantization import (
    BITS,
    QuantizedTensor,
    cache_bytes,
    dequantize,
    pack_codes,
    quantize,
    quantize_keys,
    quantize_values,
    unpack_codes,
)
from ssm_llm.kv.rotate_kv import RotateKV
from ssm_llm.kv.shadow_kv import ShadowKV, ShadowKVCache
from ssm_llm.kv.snapkv import SnapKV
from ssm_llm.kv.squeezed_attention import SqueezedAttention, SqueezedCache
from ssm_llm.kv.streaming_llm import StreamingLLM
from ssm_llm.kv.token_select import TokenSelect, TokenSelectCache
from ssm_llm.kv.xkv import XKV

__all__ = [
    "BITS",
    "GEAR",
    "InfLLM",
    "InfLLMCache",
    "KIVI",
    "XKV",
    "AttentionStep",
    "CompressedCache",
    "KVPolicy",
    "MInference",
    "MiniCache",
    "MixedPrecisionKV",
    "PrefillObservation",
    "QuantizedTensor",
    "RotateKV",
    "ShadowKV",
    "ShadowKVCache",
    "SnapKV",
    "SqueezedAttention",
    "SqueezedCache",
    "StreamingLLM",
    "TokenSelect",
    "TokenSelectCache",
    "cache_bytes",
    "compress_cache",
    "dequantize",
    "describe",
    "pack_codes",
    "prefill",
    "quantize",
    "quantize_keys",
    "quantize_values",
    "unpack_codes",
]
