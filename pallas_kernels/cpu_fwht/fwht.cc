// The block Walsh-Hadamard transform of float32 rows on x86-64, as the XLA FFI custom call SsmLlmFwht:
// x [..., n] -> out [..., n], every `block` consecutive channels of a row multiplied by H_block (Sylvester's
// construction), then by `scale` (1 / sqrt(block)).
//
// Why: W8A8 with rotation transforms the input of every linear layer (`ssm_llm.hadamard.block_hadamard`). XLA
// runs each of the transform's log2(block) butterfly stages as a separate pass (it cannot fuse a butterfly
// network without recomputing it exponentially): 27 passes per SmolLM2 layer, ~2.3 ms of an 18 ms 9-row
// verification forward on the 2-core EPYC. Here a row's block stays in L1 through all stages: stages 1, 2 and 4
// in registers (permutes and blends of 8 floats), the larger ones two per pass, the scale in the last pass. On the
// 2-core EPYC: 16 rows of 576 (blocks of 64) in 3.6 us, 16 rows of 1536 (blocks of 512) in 9 us (the loops of
// scalar stages the compiler vectorized only from h = 8 on, a stage per pass: 16 and 46 us). Helper threads did
// not pay at these sizes.
//
// The same float operations in the same order as `ssm_llm.hadamard.fwht_reference`: stage h = 1, 2, 4, ... turns every
// pair (j, j + h) inside blocks of 2h into (a + b, a - b), then every element is multiplied by scale. So the
// result is bit-identical to `fwht_reference` on the same (materialised) input, and each row's result is
// independent of the other rows. (Inside a model XLA had fused the first stage into its producer and contracted
// it there, so W8A8 outputs moved in the last bits when this kernel replaced it.)
#include <immintrin.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Stages h = 1, 2, 4 on 8 consecutive floats: each stage pairs a vector with a permuted copy of itself; the lower
// element of a pair takes a + b (a from the vector, b from the copy), the upper one a - b (a from the copy).
inline __m256 first_three_stages(__m256 v) {
  __m256 s = _mm256_permute_ps(v, 0xB1);  // (1 0 3 2) in each 128-bit half
  v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
  s = _mm256_permute_ps(v, 0x4E);  // (2 3 0 1)
  v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
  s = _mm256_permute2f128_ps(v, v, 0x01);  // the halves swapped
  return _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
}

// One block: src -> y (both `block` floats; they may be the same). Stages h = 1, 2, 4 in registers as src is read,
// then the larger stages two at a time (the four elements t, t + h, t + 2h, t + 3h: stage h pairs the first two and
// the last two, stage 2h the first and third, the second and fourth), the last pass multiplying by scale.
void transform_block(const float* src, float* y, int64_t block, float scale) {
  if (block < 8) {
    for (int64_t i = 0; i < block; ++i) y[i] = src[i];
    for (int64_t h = 1; h < block; h *= 2)
      for (int64_t j = 0; j < block; j += 2 * h)
        for (int64_t t = 0; t < h; ++t) {
          const float a = y[j + t], b = y[j + h + t];
          y[j + t] = a + b;
          y[j + h + t] = a - b;
        }
    for (int64_t i = 0; i < block; ++i) y[i] *= scale;
    return;
  }
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < block; i += 8) {
    const __m256 v = first_three_stages(_mm256_loadu_ps(src + i));
    _mm256_storeu_ps(y + i, block == 8 ? _mm256_mul_ps(v, s) : v);
  }
  for (int64_t h = 8; h < block;) {
    if (4 * h <= block) {
      const bool last = 4 * h == block;
      for (int64_t j = 0; j < block; j += 4 * h)
        for (int64_t t = j; t < j + h; t += 8) {
          const __m256 a = _mm256_loadu_ps(y + t), b = _mm256_loadu_ps(y + t + h);
          const __m256 c = _mm256_loadu_ps(y + t + 2 * h), d = _mm256_loadu_ps(y + t + 3 * h);
          const __m256 ab = _mm256_add_ps(a, b), a_b = _mm256_sub_ps(a, b);
          const __m256 cd = _mm256_add_ps(c, d), c_d = _mm256_sub_ps(c, d);
          __m256 o0 = _mm256_add_ps(ab, cd), o1 = _mm256_add_ps(a_b, c_d);
          __m256 o2 = _mm256_sub_ps(ab, cd), o3 = _mm256_sub_ps(a_b, c_d);
          if (last) o0 = _mm256_mul_ps(o0, s), o1 = _mm256_mul_ps(o1, s), o2 = _mm256_mul_ps(o2, s), o3 = _mm256_mul_ps(o3, s);
          _mm256_storeu_ps(y + t, o0);
          _mm256_storeu_ps(y + t + h, o1);
          _mm256_storeu_ps(y + t + 2 * h, o2);
          _mm256_storeu_ps(y + t + 3 * h, o3);
        }
      h *= 4;
    } else {  // one stage left (2h == block): the last
      for (int64_t t = 0; t < h; t += 8) {
        const __m256 a = _mm256_loadu_ps(y + t), b = _mm256_loadu_ps(y + t + h);
        _mm256_storeu_ps(y + t, _mm256_mul_ps(_mm256_add_ps(a, b), s));
        _mm256_storeu_ps(y + t + h, _mm256_mul_ps(_mm256_sub_ps(a, b), s));
      }
      h *= 2;
    }
  }
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
  for (int64_t i = 0; i < rows * n; i += block) transform_block(xp + i, op + i, block, scale);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmLlmFwht, FwhtImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
