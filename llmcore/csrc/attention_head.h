// One head of a decoding step's attention (one query against the cached keys and values),
// shared by decode_attention.cpp and gpt_decode.cpp; decode_attention.cpp describes the method.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace llmcore_attention {

#if defined(__AVX512F__)
// e^x for x <= 0 (a softmax's shifted scores): 2^n * e^r, n = round(x / ln 2), |r| <= ln(2) / 2,
// e^r by its Taylor series to degree 7 (relative error < 1e-8, below fp32's rounding).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is below fp32's smallest subnormal
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts, exactly
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

// One head: scores (T) in `s`, then the weighted sum of v's rows into out (D).
inline void one_head(const float* q, const float* k, int64_t k_row, const float* v, int64_t v_row, int64_t T, int64_t D,
              float scale, float* s, float* out) {
  float smax = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  if (D % 16 == 0 && D <= 256) {
    const int64_t C = D / 16;
    __m512 qv[16];
    for (int64_t c = 0; c < C; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
    for (int64_t t = 0; t < T; ++t) {
      const float* kr = k + t * k_row;
      __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr)), a1 = _mm512_setzero_ps();
      for (int64_t c = 1; c < C; c += 2) {
        a1 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), a1);
        if (c + 1 < C) a0 = _mm512_fmadd_ps(qv[c + 1], _mm512_loadu_ps(kr + 16 * c + 16), a0);
      }
      s[t] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      smax = std::max(smax, s[t]);
    }
    __m512 sum = _mm512_setzero_ps();
    const __m512 mx = _mm512_set1_ps(smax);
    int64_t t = 0;
    for (; t + 16 <= T; t += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), mx));
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (t < T) {
      const __mmask16 m = static_cast<__mmask16>((1u << (T - t)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), mx));
      _mm512_mask_storeu_ps(s + t, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum);
    __m512 acc[2][16];
    for (int64_t c = 0; c < C; ++c) acc[0][c] = acc[1][c] = _mm512_setzero_ps();
    for (t = 0; t < T; ++t) {
      const __m512 p = _mm512_set1_ps(s[t]);
      const float* vr = v + t * v_row;
      for (int64_t c = 0; c < C; ++c) acc[t & 1][c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * c), acc[t & 1][c]);
    }
    for (int64_t c = 0; c < C; ++c)
      _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(acc[0][c], acc[1][c]), _mm512_set1_ps(inv)));
    return;
  }
#endif
  // Any other head size or CPU: plain loops, summed in double.
  for (int64_t t = 0; t < T; ++t) {
    double d = 0.;
    for (int64_t c = 0; c < D; ++c) d += static_cast<double>(q[c]) * k[t * k_row + c];
    s[t] = static_cast<float>(d * scale);
    smax = std::max(smax, s[t]);
  }
  double sum = 0.;
  for (int64_t t = 0; t < T; ++t) sum += (s[t] = std::exp(s[t] - smax));
  for (int64_t c = 0; c < D; ++c) {
    double acc = 0.;
    for (int64_t t = 0; t < T; ++t) acc += static_cast<double>(s[t]) * v[t * v_row + c];
    out[c] = static_cast<float>(acc / sum);
  }
}

}  // namespace llmcore_attention
