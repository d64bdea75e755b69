// The block Walsh-Hadamard transform of float32 rows on x86-64, as the XLA FFI custom call SsmLlmFwht:
// x [..., n] -> out [..., n], every `block` consecutive channels of a row multiplied by H_block (Sylvester's
// construction), then by `scale` (1 / sqrt(block)).
//
// Why: W8A8 with rotation transforms the input of every linear layer (`ssm_llm.hadamard.block_hadamard`). XLA
// runs each of the transform's log2(block) butterfly stages as a separate pass (it cannot fuse a butterfly
// network without recomputing it exponentially): 27 passes per SmolLM2 layer, ~2.3 ms of an 18 ms 9-row
// verification forward on the 2-core EPYC. Here a row's block stays in L1 through all stages.
//
// The same float operations in the same order as `ssm_llm.hadamard.fwht_reference`: stage h = 1, 2, 4, ... turns every
// pair (j, j + h) inside blocks of 2h into (a + b, a - b), then every element is multiplied by scale. So the
// result is bit-identical to `fwht_reference` on the same (materialised) input, and each row's result is
// independent of the other rows. (Inside a model XLA had fused the first stage into its producer and contracted
// it there, so W8A8 outputs moved in the last bits when this kernel replaced it.)
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void transform_block(float* y, int64_t block, float scale) {
  for (int64_t h = 1; h < block; h *= 2)
    for (int64_t j = 0; j < block; j += 2 * h)
      for (int64_t t = 0; t < h; ++t) {  // independent pairs: vectorized by the compiler for h >= 8
        const float a = y[j + t], b = y[j + h + t];
        y[j + t] = a + b;
        y[j + h + t] = a - b;
      }
  for (int64_t i = 0; i < block; ++i) y[i] *= scale;
}

ffi::Error FwhtImpl(ffi::Buffer<ffi::F32> x, int64_t block, float scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();  // [..., n]: every leading index is a row
  if (xd.size() < 1) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ssm_llm_fwht: x [..., n] expected");
  const int64_t n = xd[xd.size() - 1], rows = n ? static_cast<int64_t>(x.element_count()) / n : 0;
  if (block < 1 || (block & (block - 1)) || n % block)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "ssm_llm_fwht: block must be a power of two dividing the row length");
  const float* xp = x.typed_data();
  float* op = out->typed_data();
  if (op != xp) std::memcpy(op, xp, sizeof(float) * rows * n);
  for (int64_t i = 0; i < rows * n; i += block) transform_block(op + i, block, scale);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmLlmFwht, FwhtImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
