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

#include <string>
#include <vector>

#include "int8_block.h"

namespace {

using namespace llmcore_int8;

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
