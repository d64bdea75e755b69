// Masked attention of a few query rows over a float32 KV cache on x86-64 AVX2, as the XLA FFI custom call
// SsmLlmMaskedAttention: q [B, T, H, D], k and v [B, H_kv, S, D], visible [B, T, S] (uint8) -> out [B, T, H, D],
// out = softmax(scale * q k^T over the visible keys) v, zeros for a row that sees no key.
//
// Why: decode and draft-tree verification attend with a handful of query rows, where XLA's CPU dots (M = 3 rows
// per GQA group) ran at ~6 GMAC/s: 2.1 ms of a 7.8 ms SmolLM2 decode step. And XLA's sums depend on how many rows
// a call has and where a key sits, so a draft-tree node and the same token decoded alone differed in the last
// bits; int8 activations (W8A8) turn such bits into whole rounding steps, and speculative decoding on a W8A8
// model did not reproduce plain decoding.
//
// Every query row is computed alone by the same code, over its visible keys compacted in slot order: the
// result depends only on the row's query and the sequence of visible keys and values, not on T, on the other
// rows, nor on the slots the keys sit in. So a tree node (its prefix, then its ancestors) gets the bits of the
// same token decoded after its accepted path (the prefix, then the path at consecutive slots).
//   score_i = scale * q . k_i      one FMA chain over D in 8-float lanes, then a fixed horizontal sum;
//   p_i     = exp(score_i - max)   a polynomial exp, 8 visible keys per vector (lane = i mod 8);
//   out     = (sum_i p_i v_i) / (sum_i p_i)   sums in visible order, D in 8-float lanes.
// The (row, head) units are split over the helper threads the int8 kernel uses (cpu_workers.h); a unit's arithmetic
// does not depend on the thread.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu_workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ssm_llm_cpu::in_parts;

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n);
// below -87.3 (where exp underflows float32's normal range) it returns 0; a NaN stays NaN.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(low, x);  // max_ps returns its second operand when one is NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

inline float hsum(__m256 v) {  // a fixed order: high half + low half, then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kLanes = 8;
constexpr int64_t kChunk = 64;  // D handled in pieces of 64 floats: 8 accumulators per piece

// out[0, 8 W) = inv * sum_i p_i v[idx[i], 0, 8 W), each lane's sum in key order; W a constant, so the W
// accumulators stay in registers (with a run-time count GCC kept them on the stack: a store and a load per FMA).
template <int W>
void weighted_sum(const float* v, const int64_t* idx, int64_t n, int64_t D, const float* p, float inv, float* out) {
  __m256 acc[W];
  for (int c = 0; c < W; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* value = v + idx[i] * D;
    const __m256 pi = _mm256_set1_ps(p[i]);
    for (int c = 0; c < W; ++c) acc[c] = _mm256_fmadd_ps(pi, _mm256_loadu_ps(value + c * kLanes), acc[c]);
  }
  const __m256 norm = _mm256_set1_ps(inv);
  for (int c = 0; c < W; ++c) _mm256_storeu_ps(out + c * kLanes, _mm256_mul_ps(acc[c], norm));
}

// weighted_sum for the last w < kChunk / kLanes lanes of D.
void weighted_sum_tail(const float* v, const int64_t* idx, int64_t n, int64_t D, int64_t w, const float* p, float inv,
                       float* out) {
  switch (w) {
    case 1: return weighted_sum<1>(v, idx, n, D, p, inv, out);
    case 2: return weighted_sum<2>(v, idx, n, D, p, inv, out);
    case 3: return weighted_sum<3>(v, idx, n, D, p, inv, out);
    case 4: return weighted_sum<4>(v, idx, n, D, p, inv, out);
    case 5: return weighted_sum<5>(v, idx, n, D, p, inv, out);
    case 6: return weighted_sum<6>(v, idx, n, D, p, inv, out);
    case 7: return weighted_sum<7>(v, idx, n, D, p, inv, out);
    default: std::abort();  // D is a multiple of 8: 1..7 lanes are left
  }
}

// One query row q [D] of one head against the n visible keys/values (rows idx[0..n) of k, v [S, D]) -> out [D].
// scores: scratch of n rounded up to 8 floats.
void attend_row(const float* q, const float* k, const float* v, const int64_t* idx, int64_t n, int64_t D,
                float scale, float* scores, float* out) {
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = 0; i < n; ++i) {
    const float* key = k + idx[i] * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += kLanes) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key + d), acc);
    scores[i] = hsum(acc) * scale;
  }
  const float lowest = -INFINITY;
  for (int64_t i = n; i < padded; ++i) scores[i] = lowest;
  __m256 mx = _mm256_set1_ps(lowest);
  for (int64_t i = 0; i < padded; i += kLanes) mx = _mm256_max_ps(mx, _mm256_loadu_ps(scores + i));
  const __m256 top = _mm256_set1_ps(hmax(mx));
  __m256 total = _mm256_setzero_ps();
  for (int64_t i = 0; i < padded; i += kLanes) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + i), top));  // -inf pads give 0
    _mm256_storeu_ps(scores + i, p);
    total = _mm256_add_ps(total, p);
  }
  const float inv = 1.0f / hsum(total);
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    if (D - d0 >= kChunk)
      weighted_sum<kChunk / kLanes>(v + d0, idx, n, D, scores, inv, out + d0);
    else
      weighted_sum_tail(v + d0, idx, n, D, (D - d0) / kLanes, scores, inv, out + d0);
  }
}

// k, v: [L, B, H_kv, S, D], every layer's cache; layer: which one to read (so XLA passes the stacked cache as it
// is instead of copying one layer out of it for the call).
ffi::Error MaskedAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::U8> visible, ffi::Buffer<ffi::S32> layer, float scale,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = visible.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || md.size() != 3 || v.dimensions().size() != 5 || layer.element_count() != 1)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "ssm_llm_masked_attention: q [B, T, H, D], k, v [L, B, H_kv, S, D], visible [B, T, S] and a "
                      "scalar layer expected");
  const int64_t B = qd[0], T = qd[1], H = qd[2], D = qd[3], L = kd[0], Hkv = kd[2], S = kd[3];
  const int64_t l = layer.typed_data()[0];
  const auto vd = v.dimensions();
  bool same = true;
  for (int i = 0; i < 5; ++i) same = same && vd[i] == kd[i];
  if (!same || kd[1] != B || kd[4] != D || Hkv < 1 || H % Hkv || D % kLanes || md[0] != B || md[1] != T || md[2] != S)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "ssm_llm_masked_attention: shapes disagree (v as k, H a multiple of H_kv, D a multiple of 8)");
  if (l < 0 || l >= L) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ssm_llm_masked_attention: layer out of range");
  const int64_t G = H / Hkv;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data() + l * B * Hkv * S * D;
  const float* vp = v.typed_data() + l * B * Hkv * S * D;
  const uint8_t* mp = visible.typed_data();
  float* op = out->typed_data();
  // (row, head) units split between the threads; each part compacts a row's visible slots once for its heads. A
  // unit's arithmetic does not depend on which thread runs it, so the bits do not either.
  const int64_t padded = (S + kLanes - 1) / kLanes * kLanes;
  in_parts(B * T * H, [&](int64_t u0, int64_t u1) {
    std::vector<int64_t> idx(S);
    std::vector<float> scores(padded);
    int64_t compacted = -1, n = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = u / H, h = u % H, b = r / T;
      if (r != compacted) {
        const uint8_t* row = mp + r * S;
        n = 0;
        for (int64_t s = 0; s < S; ++s)
          if (row[s]) idx[n++] = s;
        compacted = r;
      }
      float* o = op + u * D;
      if (n == 0) {
        for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
        continue;
      }
      const int64_t kv = h / G;
      attend_row(qp + u * D, kp + (b * Hkv + kv) * S * D, vp + (b * Hkv + kv) * S * D, idx.data(), n, D, scale,
                 scores.data(), o);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmLlmMaskedAttention, MaskedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
