// y = x @ (W * scale[:, None]).T + bias for int8 weights W (N, K) and fp32 activations x (M, K).
//
// A decoding step multiplies one row of x (a few, for a short prompt) by every weight matrix, so
// its time is reading the weights, which int8 makes a quarter of fp32's bytes, provided the
// arithmetic keeps up with the memory. Converting int8 to fp32 (sign-extend, convert, multiply-
// add) does not: one core converts ~12 GB/s of weights where it reads ~27. So each row of x is
// quantized to int16 (one scale per row, 15 bits: max |x| maps to 32767) and multiplied by the
// int8 weights sign-extended to int16 with a pairwise multiply-add into int32 lanes (AVX-512 VNNI
// vpdpwssd, AVX2 vpmaddwd).
//
// The weights come packed so that they stream like one array (see llmcore.int8_kernel.pack):
// blocks of 16 output rows; within a block, for each pair of input columns (2p, 2p + 1), the 16
// rows' two values, 32 bytes: packed[b][p][j][t] = W[16b + j][2p + t]. One 64-byte load then
// feeds two multiply-adds whose 16 int32 lanes are the block's 16 outputs, with x's pair
// broadcast; no horizontal sums, and the rows past N and columns past K are zeros.
//
// Each lane sums 2 products of at most 32767 * 127 per multiply-add; summing kPairBlock = 256
// pairs per accumulator pair stays below 2^31, and longer rows are summed in fp32 across blocks.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

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

// Each row of x (M x K) as int16 column pairs packed in int32, zero-padded to `pairs`, and its scale.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t pairs, std::vector<int32_t>& q, std::vector<float>& s) {
  std::vector<int16_t> row16(pairs * 2);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
    const float scale = amax > 0.f && std::isfinite(amax) ? amax / 32767.f : 1.f;
    const float inv = 1.f / scale;
    std::fill(row16.begin(), row16.end(), int16_t(0));
    for (int64_t k = 0; k < K; ++k) row16[k] = static_cast<int16_t>(std::nearbyint(std::clamp(row[k] * inv, -32767.f, 32767.f)));
    std::memcpy(q.data() + m * pairs, row16.data(), pairs * sizeof(int32_t));
    s[m] = scale;
  }
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                          const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat, "int8_linear: x must be fp32 on CPU");
  TORCH_CHECK(packed.scalar_type() == torch::kChar && packed.dim() == 4 && packed.size(2) == kRows &&
                  packed.size(3) == 2 && packed.size(1) % 2 == 0 && packed.is_contiguous(),
              "int8_linear: weights must be packed int8 (blocks, pairs, 16, 2), pairs even");
  const int64_t K = x.size(-1), N = scale.numel(), pairs = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(K <= 2 * pairs && N <= blocks * kRows, "int8_linear: x has ", K, " features and scale ", N,
              " outputs, the packed weights hold at most ", 2 * pairs, " and ", blocks * kRows);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous(), "int8_linear: scale must be fp32 (N,)");
  torch::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat && b.numel() == N, "int8_linear: bias must be fp32 (N,)");
    bp = b.data_ptr<float>();
  }
  const torch::Tensor xc = x.contiguous();
  const int64_t M = K ? xc.numel() / K : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  auto y = torch::empty(out_shape, x.options());
  std::vector<int32_t> q(M * pairs);
  std::vector<float> sx(M);
  quantize_rows(xc.data_ptr<float>(), M, K, pairs, q, sx);
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Blocks split across threads: each weight byte is read from memory once, by one thread, and
  // used for every row of x while it sits in the cache.
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    float out[kRowGroup * kRows];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int8_t* w = wp + blk * pairs * 2 * kRows;
      const int64_t n0 = blk * kRows, cols = std::min(kRows, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRowGroup) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, M - m0));
        block_dot(q.data() + m0 * pairs, pairs, rows, w, pairs, out);
        for (int r = 0; r < rows; ++r) {
          const int64_t m = m0 + r;
          for (int64_t j = 0; j < cols; ++j)
            yp[m * N + n0 + j] = out[r * kRows + j] * sx[m] * sp[n0 + j] + (bp ? bp[n0 + j] : 0.f);
        }
      }
    }
  });
  return y;
}

std::string isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY(llmcore, m) {
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int8_linear_isa() -> str");
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) { m.impl("int8_linear", int8_linear); }

TORCH_LIBRARY_IMPL(llmcore, CompositeExplicitAutograd, m) { m.impl("int8_linear_isa", isa); }
