// int8 x [M, K] times int8 w [K, N] -> exact int32 [M, N] on x86-64 AVX2, as XLA FFI custom calls: w in its
// plain [K, N] layout (SsmLlmInt8Dot) or in the blocked layout written at load time (SsmLlmInt8DotBlocked, below:
// the faster one).
//
// Why: decode multiplies one or two activation rows by every weight matrix, and XLA's CPU integer dot is slow
// there (one row takes a slow path, so the library padded it to two). This kernel reads the weights in their
// [K, N] layout, four rows of K at a time, and multiplies with vpmaddubsw + vpmaddwd (the instructions
// llama.cpp's AVX2 path uses), or with one vpdpbusd where the CPU has AVX-512 VNNI.
//
// The product of four consecutive k for one column: the four weight rows' 32-byte slices are interleaved
// (unpack epi8 then epi16) so that each 32-bit lane holds w[k..k+3, n]; x[m, k..k+3] is broadcast to every
// lane; the unsigned operand is |w|, the signed one sign(w) * x, and adjacent products are summed into int16
// (maddubs) then int32 (madd). |w| <= 128 and |x| <= 127 keep each pair sum <= 32512 < 2^15: exact for every
// weight code and for activation codes in [-127, 127] (W8A8 rounds activations into that range; x = -128 is
// outside the contract). The interleaving permutes columns inside a 32-column block; the stores undo it.
// Rows of K are walked in tiles of 16 with software prefetch: a [K, N] weight read 32 columns at a time is a
// strided walk (one 32-byte slice per row), which the hardware prefetchers alone followed at a third of the
// memory bandwidth.
#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "cpu_workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ssm_llm_cpu::in_parts;

constexpr int64_t kCols = 32;   // columns per block: one 32-byte slice of a weight row
constexpr int64_t kGroup = 4;   // rows of K per maddubs + madd
constexpr int64_t kTile = 4;    // groups of K per pass over the columns (16 rows: 16 streams to prefetch)
constexpr int64_t kAhead = 1024;  // software prefetch distance along a weight row, in bytes
constexpr int64_t kMaxBlocks = 256;  // column blocks per accumulator pass (8192 columns)

// acc + the four-term sums of |w| * (sign(w) x) per 32-bit lane: one vpdpbusd where the CPU has AVX-512 VNNI
// (built with -mavx512vnni -mavx512vl), else vpmaddubsw + vpmaddwd + vpaddd.
inline __m256i dot4(__m256i acc, __m256i w, __m256i xb, [[maybe_unused]] __m256i ones) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(xb, w));
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xb, w)), ones));
#endif
}

// acc[i] holds columns {4i..4i+3} (low 128 bits) and {16+4i..16+4i+3} (high 128 bits) of a block.
inline void store_block(const __m256i* acc, int32_t* out) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 0), _mm256_permute2x128_si256(acc[0], acc[1], 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), _mm256_permute2x128_si256(acc[2], acc[3], 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(acc[0], acc[1], 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 24), _mm256_permute2x128_si256(acc[2], acc[3], 0x31));
}

// R rows of x against column blocks [b0, b1) and k groups [g0, g1), added into acc [R][b1 - b0][4].
template <int R>
void tile(const int8_t* x, const int8_t* w, __m256i* acc, int64_t K, int64_t N, int64_t b0, int64_t b1,
          int64_t g0, int64_t g1) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = b1 - b0;
  for (int64_t b = b0; b < b1; ++b) {
    __m256i a[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_si256();
    const int8_t* p = w + g0 * kGroup * N + b * kCols;
    for (int64_t g = g0; g < g1; ++g, p += kGroup * N) {
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(p + j * N + kAhead), _MM_HINT_T0);
      __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + N));
      __m256i r2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * N));
      __m256i r3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 3 * N));
      __m256i t0 = _mm256_unpacklo_epi8(r0, r1), t1 = _mm256_unpackhi_epi8(r0, r1);
      __m256i t2 = _mm256_unpacklo_epi8(r2, r3), t3 = _mm256_unpackhi_epi8(r2, r3);
      __m256i u[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2),
                      _mm256_unpacklo_epi16(t1, t3), _mm256_unpackhi_epi16(t1, t3)};
      for (int r = 0; r < R; ++r) {
        int32_t v;
        std::memcpy(&v, x + r * K + g * kGroup, 4);
        const __m256i xb = _mm256_set1_epi32(v);
        for (int i = 0; i < 4; ++i) a[r][i] = dot4(a[r][i], u[i], xb, ones);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) {
        __m256i* q = acc + (r * nb + (b - b0)) * 4 + i;
        *q = _mm256_add_epi32(*q, a[r][i]);
      }
  }
}

// Full blocks [b0, b1) (at most kMaxBlocks) of every row, K rounded down to a multiple of 4.
void blocks(const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t K, int64_t N, int64_t b0,
            int64_t b1) {
  alignas(32) static thread_local __m256i acc[2 * kMaxBlocks * 4];
  const int64_t nb = b1 - b0, groups = K / kGroup;
  for (int64_t m = 0; m < M; m += 2) {
    const int R = M - m >= 2 ? 2 : 1;
    for (int64_t i = 0; i < R * nb * 4; ++i) acc[i] = _mm256_setzero_si256();
    for (int64_t g0 = 0; g0 < groups; g0 += kTile) {
      const int64_t g1 = std::min(groups, g0 + kTile);
      if (R == 2)
        tile<2>(x + m * K, w, acc, K, N, b0, b1, g0, g1);
      else
        tile<1>(x + m * K, w, acc, K, N, b0, b1, g0, g1);
    }
    for (int r = 0; r < R; ++r)
      for (int64_t b = b0; b < b1; ++b) store_block(acc + (r * nb + (b - b0)) * 4, out + (m + r) * N + b * kCols);
  }
}

// Columns [n0, n1) for every row, with scalar sums where the vector blocks do not reach (a column tail past
// the last full block, K's last K % 4 rows).
void columns(const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t K, int64_t N, int64_t n0,
             int64_t n1) {
  const int64_t full_end = std::min(n1, N / kCols * kCols);
  for (int64_t b = n0 / kCols; b < full_end / kCols; b += kMaxBlocks)
    blocks(x, w, out, M, K, N, b, std::min(full_end / kCols, b + kMaxBlocks));
  const int64_t k_vec = K / kGroup * kGroup;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      const bool vector = n < full_end;
      int32_t s = vector ? out[m * N + n] : 0;
      for (int64_t k = vector ? k_vec : 0; k < K; ++k) s += int32_t(x[m * K + k]) * int32_t(w[k * N + n]);
      out[m * N + n] = s;
    }
}

// Blocked weights: [Nb, Kg, 128] int8 with byte (b, g, 4c + j) = w[4g + j, 32b + c], zero past K and N
// (`block_weights` in weights.py writes them once, at load time). One column block's K x 32 codes are then one
// contiguous stream, read once for all rows (from L1/L2 after the first rows), and each 32-bit lane of a
// 32-byte load already holds four consecutive k of one column: no interleaving, and the sums come out in column
// order. With AVX-512 VNNI the activations are made unsigned instead of the weights (x + 128, one xor when x is
// copied), so each row costs one vpdpbusd per vector and no sign fix-up; the extra 128 * sum_k w[k, n] is taken
// off at the end, the column sums coming from one more vpdpbusd per vector against ones, shared by all rows.
constexpr int64_t kBlockBytes = kCols * kGroup;  // 128: one group of 4 rows of K x 32 columns
constexpr int64_t kAheadBlocked = 768;           // software prefetch distance along the stream, in bytes
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool kUnsignedX = true;  // x stored as x + 128 (uint8)
constexpr int kMaxRows = 6;        // rows per pass (3-6 in 512-bit registers, `wide_rows`; 1-2 in 256-bit ones)
#else
constexpr bool kUnsignedX = false;
constexpr int kMaxRows = 2;  // 8 accumulators + 4 weights (+ |w|) of 16 ymm registers
#endif

template <int R>
void blocked_rows(const int8_t* x, int64_t Kp, const int8_t* p, int64_t Kg, int32_t* out, int64_t N, int64_t n0) {
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256i a[R][4], sums[4];
  for (int v = 0; v < 4; ++v) {
    sums[v] = _mm256_setzero_si256();
    for (int r = 0; r < R; ++r) a[r][v] = _mm256_setzero_si256();
  }
  for (int64_t g = 0; g < Kg; ++g, p += kBlockBytes) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kAheadBlocked), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + kAheadBlocked + 64), _MM_HINT_T0);
    __m256i w[4];
    for (int v = 0; v < 4; ++v) w[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * v));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    const __m256i ones8 = _mm256_set1_epi8(1);
    for (int v = 0; v < 4; ++v) sums[v] = _mm256_dpbusd_epi32(sums[v], ones8, w[v]);
#endif
    for (int r = 0; r < R; ++r) {
      int32_t xv;
      std::memcpy(&xv, x + r * Kp + g * kGroup, 4);
      const __m256i xb = _mm256_set1_epi32(xv);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
      for (int v = 0; v < 4; ++v) a[r][v] = _mm256_dpbusd_epi32(a[r][v], xb, w[v]);
#else
      for (int v = 0; v < 4; ++v) a[r][v] = dot4(a[r][v], w[v], xb, ones);
#endif
    }
  }
  if constexpr (kUnsignedX)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) a[r][v] = _mm256_sub_epi32(a[r][v], _mm256_slli_epi32(sums[v], 7));
  const int64_t width = std::min<int64_t>(kCols, N - n0);
  for (int r = 0; r < R; ++r) {
    int32_t* o = out + r * N + n0;
    if (width == kCols) {
      for (int v = 0; v < 4; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8 * v), a[r][v]);
    } else {
      alignas(32) int32_t tmp[kCols];
      for (int v = 0; v < 4; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8 * v), a[r][v]);
      std::memcpy(o, tmp, width * sizeof(int32_t));
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
// blocked_rows for 3-6 rows in 512-bit registers: a group's 128 bytes are two vectors (columns 0-15, 16-31), so a
// row costs two vpdpbusd per group and the column sums two for all rows. The accumulators are named variables:
// GCC 12 kept an array of them partly on the stack inside the loop (moves and stores between the dot products),
// which held the 4-row 256-bit version to ~98 GMAC/s on one core of the 2-core AVX-512 EPYC where this one makes
// ~185 (vpdpbusd's peak there: ~230). Past 6 rows (12 accumulators) it spilled again.
inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#define SSM_LLM_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int R>
void wide_rows(const int8_t* x, int64_t Kp, const int8_t* p, int64_t Kg, int32_t* out, int64_t N, int64_t n0) {
  static_assert(R >= 1 && R <= 6);
#define SSM_LLM_DECLARE(r) __m512i lo##r = _mm512_setzero_si512(), hi##r = _mm512_setzero_si512();
  SSM_LLM_ROWS6(SSM_LLM_DECLARE)
  __m512i sum_lo = _mm512_setzero_si512(), sum_hi = _mm512_setzero_si512();
  const __m512i ones8 = _mm512_set1_epi8(1);
  for (int64_t g = 0; g < Kg; ++g, p += kBlockBytes) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kAheadBlocked), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + kAheadBlocked + 64), _MM_HINT_T0);
    const __m512i w_lo = _mm512_loadu_si512(p), w_hi = _mm512_loadu_si512(p + 64);
    sum_lo = _mm512_dpbusd_epi32(sum_lo, ones8, w_lo);
    sum_hi = _mm512_dpbusd_epi32(sum_hi, ones8, w_hi);
#define SSM_LLM_STEP(r)                                                   \
  if constexpr (R > r) {                                                  \
    const __m512i xb = _mm512_set1_epi32(load4(x + r * Kp + g * kGroup)); \
    lo##r = _mm512_dpbusd_epi32(lo##r, xb, w_lo);                         \
    hi##r = _mm512_dpbusd_epi32(hi##r, xb, w_hi);                         \
  }
    SSM_LLM_ROWS6(SSM_LLM_STEP)
  }
  sum_lo = _mm512_slli_epi32(sum_lo, 7);  // x was stored as x + 128: take 128 * sum_k w[k, n] off
  sum_hi = _mm512_slli_epi32(sum_hi, 7);
  const int64_t width = std::min<int64_t>(kCols, N - n0);
  const __mmask16 mask_lo = width >= 16 ? 0xFFFF : (1u << width) - 1;
  const __mmask16 mask_hi = width >= 32 ? 0xFFFF : width <= 16 ? 0 : (1u << (width - 16)) - 1;
#define SSM_LLM_STORE(r)                                                                  \
  if constexpr (R > r) {                                                                  \
    int32_t* o = out + r * N + n0;                                                        \
    _mm512_mask_storeu_epi32(o, mask_lo, _mm512_sub_epi32(lo##r, sum_lo));                \
    _mm512_mask_storeu_epi32(o + 16, mask_hi, _mm512_sub_epi32(hi##r, sum_hi));           \
  }
  SSM_LLM_ROWS6(SSM_LLM_STORE)
#undef SSM_LLM_DECLARE
#undef SSM_LLM_STEP
#undef SSM_LLM_STORE
}
#undef SSM_LLM_ROWS6
#endif

// Rows in the next pass over a column block, of `left`: passes of at most kMaxRows, as even as they go (9 rows:
// 5 + 4, not 6 + 3), 1-2 rows in 256-bit registers.
inline int rows_in_pass(int64_t left) {
  const int64_t passes = (left + kMaxRows - 1) / kMaxRows;
  return static_cast<int>((left + passes - 1) / passes);
}

// Column blocks [b0, b1) of every row; x is [M, Kp] (K padded with zeros to Kp = 4 Kg; + 128 if kUnsignedX).
void blocked_columns(const int8_t* x, int64_t Kp, const int8_t* wb, int64_t Kg, int32_t* out, int64_t M, int64_t N,
                     int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* p = wb + b * Kg * kBlockBytes;
    for (int64_t m = 0; m < M;) {
      const int R = rows_in_pass(M - m);
      const int8_t* xr = x + m * Kp;
      int32_t* o = out + m * N;
      switch (R) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        case 6: wide_rows<6>(xr, Kp, p, Kg, o, N, b * kCols); break;
        case 5: wide_rows<5>(xr, Kp, p, Kg, o, N, b * kCols); break;
        case 4: wide_rows<4>(xr, Kp, p, Kg, o, N, b * kCols); break;
        case 3: wide_rows<3>(xr, Kp, p, Kg, o, N, b * kCols); break;
#endif
        case 2: blocked_rows<2>(xr, Kp, p, Kg, o, N, b * kCols); break;
        case 1: blocked_rows<1>(xr, Kp, p, Kg, o, N, b * kCols); break;
        default: std::abort();  // rows_in_pass gives 1..kMaxRows
      }
      m += R;
    }
  }
}

ffi::Error Int8DotImpl(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ssm_llm_int8_dot: x [M, K] and w [K, N] expected");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* op = out->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(op, op + M * N, 0);
    return ffi::Error::Success();
  }
  in_parts((N + kCols - 1) / kCols, [&](int64_t b0, int64_t b1) {
    columns(xp, wp, op, M, K, N, b0 * kCols, std::min(N, b1 * kCols));
  });
  return ffi::Error::Success();
}

ffi::Error Int8DotBlockedImpl(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2 || od[0] != xd[0])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "ssm_llm_int8_dot_blocked: x [M, K], blocked w [Nb, Kg, 128] and out [M, N] expected");
  const int64_t M = xd[0], K = xd[1], N = od[1], Kg = (K + kGroup - 1) / kGroup, Nb = (N + kCols - 1) / kCols;
  if (wd[0] != Nb || wd[1] != Kg || wd[2] != kBlockBytes)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "ssm_llm_int8_dot_blocked: w must be [ceil(N / 32), ceil(K / 4), 128] for x [M, K], out [M, N]");
  int32_t* op = out->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(op, op + M * N, 0);
    return ffi::Error::Success();
  }
  const int64_t Kp = Kg * kGroup;
  const int8_t* xp = x.typed_data();
  std::vector<int8_t> copy;
  if (Kp != K || kUnsignedX) {  // rows of x padded with zeros to whole groups of 4 (the padded weights are zero)
    copy.assign(M * Kp, 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(copy.data() + m * Kp, xp + m * K, K);
    if constexpr (kUnsignedX)
      for (auto& v : copy) v = static_cast<int8_t>(static_cast<uint8_t>(v) ^ 0x80);  // x + 128 as uint8
    xp = copy.data();
  }
  const int8_t* wp = w.typed_data();
  in_parts(Nb, [&](int64_t b0, int64_t b1) { blocked_columns(xp, Kp, wp, Kg, op, M, N, b0, b1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmLlmInt8Dot, Int8DotImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmLlmInt8DotBlocked, Int8DotBlockedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
