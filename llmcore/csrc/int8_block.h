// The int8 kernel's core, shared by int8_linear.cpp and gpt_decode.cpp: the 16 outputs of one
// packed block of weights for one to four quantized rows of activations (block_dot), and the
// quantization of a row of fp32 activations to int16 column pairs (quantize_row). The layout and
// the arithmetic are described in int8_linear.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llmcore_int8 {

constexpr int64_t kRows = 16;        // output rows per packed block
constexpr int64_t kPairBlock = 256;  // column pairs summed in int32 before fp32

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr const char* kIsa = "avx512_vnni";
// The 16 outputs of one block for R rows of x at once (each row's column pairs as int32, rows
// `stride` apart, `pairs` even): each weight is loaded and widened once for all R rows, U loads
// of 64 bytes per step, each pair of multiply-adds into its own accumulators. A multiply-add
// delivers its sum a few cycles later, and one chain of them per row held one core to 51 GB/s
// of weights for one row (39 for two) from the L3 cache, where two cores can read ~65 GB/s from
// memory; independent chains give 61 (45). The sign extension reads its 32 bytes from memory.
template <int R, int U>
inline void block_dot_rows(const int32_t* xp, int64_t stride, const int8_t* blk, int64_t pairs, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < pairs; p0 += kPairBlock) {
    const int64_t p1 = std::min(pairs, p0 + kPairBlock);
    __m512i a[R][2 * U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 2 * U; ++u) a[r][u] = _mm512_setzero_si512();
    auto step = [&](int64_t p, int u) {  // pairs p and p + 1 into accumulators 2u and 2u + 1
      const int8_t* w = blk + p * 2 * kRows;
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)));
      for (int r = 0; r < R; ++r) {
        a[r][2 * u] = _mm512_dpwssd_epi32(a[r][2 * u], w0, _mm512_set1_epi32(xp[r * stride + p]));
        a[r][2 * u + 1] = _mm512_dpwssd_epi32(a[r][2 * u + 1], w1, _mm512_set1_epi32(xp[r * stride + p + 1]));
      }
    };
    int64_t p = p0;
    for (; p + 2 * U <= p1; p += 2 * U)
      for (int u = 0; u < U; ++u) step(p + 2 * u, u);
    for (; p < p1; p += 2) step(p, 0);
    for (int r = 0; r < R; ++r) {
      __m512i sum = a[r][0];
      for (int u = 1; u < 2 * U; ++u) sum = _mm512_add_epi32(sum, a[r][u]);
      acc[r] = _mm512_add_ps(acc[r], _mm512_cvtepi32_ps(sum));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kRows, acc[r]);
}
constexpr int kRowGroup = 4;
// `rows` (1..kRowGroup) rows of x against one block; out is rows x 16.
inline void block_dot(const int32_t* xp, int64_t stride, int rows, const int8_t* blk, int64_t pairs, float* out) {
  switch (rows) {
    case 1: return block_dot_rows<1, 4>(xp, stride, blk, pairs, out);
    case 2: return block_dot_rows<2, 2>(xp, stride, blk, pairs, out);
    case 3: return block_dot_rows<3, 1>(xp, stride, blk, pairs, out);
    default: return block_dot_rows<4, 1>(xp, stride, blk, pairs, out);
  }
}
#elif defined(__AVX2__)
constexpr const char* kIsa = "avx2";
inline void block_dot1(const int32_t* xp, const int8_t* blk, int64_t pairs, float* out) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t p0 = 0; p0 < pairs; p0 += kPairBlock) {
    const int64_t p1 = std::min(pairs, p0 + kPairBlock);
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (int64_t p = p0; p < p1; ++p) {
      const __m256i x = _mm256_set1_epi32(xp[p]);
      const int8_t* w = blk + p * 2 * kRows;
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), x));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))), x));
    }
    lo = _mm256_add_ps(lo, _mm256_cvtepi32_ps(a0));
    hi = _mm256_add_ps(hi, _mm256_cvtepi32_ps(a1));
  }
  _mm256_storeu_ps(out, lo);
  _mm256_storeu_ps(out + 8, hi);
}
#else
constexpr const char* kIsa = "scalar";
inline void block_dot1(const int32_t* xp, const int8_t* blk, int64_t pairs, float* out) {
  for (int64_t j = 0; j < kRows; ++j) out[j] = 0.f;
  for (int64_t p0 = 0; p0 < pairs; p0 += kPairBlock) {
    int32_t acc[kRows] = {0};
    for (int64_t p = p0; p < std::min(pairs, p0 + kPairBlock); ++p) {
      const int16_t x0 = static_cast<int16_t>(xp[p] & 0xffff), x1 = static_cast<int16_t>(xp[p] >> 16);
      for (int64_t j = 0; j < kRows; ++j) acc[j] += x0 * blk[(p * kRows + j) * 2] + x1 * blk[(p * kRows + j) * 2 + 1];
    }
    for (int64_t j = 0; j < kRows; ++j) out[j] += static_cast<float>(acc[j]);
  }
}
#endif
#if !(defined(__AVX512BW__) && defined(__AVX512VNNI__))
constexpr int kRowGroup = 1;
inline void block_dot(const int32_t* xp, int64_t, int, const int8_t* blk, int64_t pairs, float* out) {
  block_dot1(xp, blk, pairs, out);
}
#endif

// One row of x (K values) as int16 column pairs packed in int32 (x[2p] in the low half),
// zero-padded to `pairs`; returns its scale (max |x| maps to 32767). Each value is
// round-to-nearest-even(clamp(x / scale, +-32767)), 16 at a time with AVX-512.
inline float quantize_row(const float* row, int64_t K, int64_t pairs, int32_t* q) {
  float amax = 0.f;
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
  const float scale = amax > 0.f && std::isfinite(amax) ? amax / 32767.f : 1.f;
  const float inv = 1.f / scale;
  auto q16 = [&](int64_t i) -> uint32_t {
    if (i >= K) return 0u;
    return static_cast<uint16_t>(static_cast<int16_t>(std::nearbyint(std::clamp(row[i] * inv, -32767.f, 32767.f))));
  };
  int64_t p = 0;
#if defined(__AVX512F__)
  const __m512 lo = _mm512_set1_ps(-32767.f), hi = _mm512_set1_ps(32767.f), vinv = _mm512_set1_ps(inv);
  for (; 2 * p + 16 <= K; p += 8) {  // cvtps rounds to nearest even, as nearbyint does by default
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(row + 2 * p), vinv), lo), hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + p), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v)));
  }
#endif
  for (; p < pairs; ++p) q[p] = static_cast<int32_t>(q16(2 * p) | (q16(2 * p + 1) << 16));
  return scale;
}

// Each row of x (M x K) quantized by quantize_row into q (M x pairs), its scale into s.
inline void quantize_rows(const float* x, int64_t M, int64_t K, int64_t pairs, std::vector<int32_t>& q, std::vector<float>& s) {
  for (int64_t m = 0; m < M; ++m) s[m] = quantize_row(x + m * K, K, pairs, q.data() + m * pairs);
}

}  // namespace llmcore_int8
