"""Weight compression from the seed papers, composable with the model protocol: `dfloat11` (lossless
bfloat16, Zhang et al. 2025)."""

from ssm_llm.compress.dfloat11 import compressed_bytes, dfloat11, encode, encode_stack

__all__ = ["compressed_bytes", "dfloat11", "encode", "encode_stack"]
