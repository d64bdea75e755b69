"""Weight compression from the seed papers, composable with the model protocol: `dfloat11` (lossless bfloat16,
Zhang et al. 2025), `bitstack` / `load_budget` (one decomposition for any memory budget, Wang et al. 2024) and
layer-wise mixed bit widths (`layer_scores`, `allocate_bits`, `quantize_layers`, `bits_per_weight`; Dumitru et
al. 2024)."""

from ssm_llm.compress.bitstack import BitStack, bitstack, load_budget
from ssm_llm.compress.dfloat11 import compressed_bytes, dfloat11, encode, encode_stack
from ssm_llm.compress.mixed_bits import allocate_bits, bits_per_weight, layer_scores, quantize_layers

__all__ = [
    "BitStack",
    "allocate_bits",
    "bits_per_weight",
    "bitstack",
    "compressed_bytes",
    "dfloat11",
    "encode",
    "encode_stack",
    "layer_scores",
    "load_budget",
    "quantize_layers",
]
