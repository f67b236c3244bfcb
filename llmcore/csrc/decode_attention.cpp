// softmax(q k^T * scale) v for one query per head against the KV cache: a decoding step's attention.
//
// Compiled, the step's attention was inductor's fused kernel: per cached position, a dot product
// of 64 values in one chain of adds and a horizontal sum, then the weighted sum of v's rows in one
// chain of multiply-adds, five loops with a barrier each: 20-45 us per layer of GPT-2 small (12
// heads, 100-200 cached positions) between two int8 matrix products that take 10-40. Here each
// head is one task (heads split across threads): its dot products overlap (each row's sum is its
// own chain), the softmax's exponentials are 16 at a time, and the weighted sum keeps two sets of
// accumulators: ~13 us for 12 heads at 100 positions, 14 at 200, from the cache (SDPA: 27, 32).
// Exact to fp32 rounding (1-2e-6 of fp64 over 1,000 positions, SDPA's own 3-4e-6).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "attention_head.h"

namespace {

using llmcore_attention::one_head;

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (batch, heads, 1, head_dim), k and v (batch, heads, keys, head_dim)");
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat, "decode_attention: fp32 CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), T = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && k.size(3) == D && v.size(3) == D && v.size(2) == T && T > 0,
              "decode_attention: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v need contiguous rows");
  const torch::Tensor qc = q.contiguous();
  auto out = torch::empty({B, H, 1, D}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      one_head(qp + i * D, kp + b * k.stride(0) + h * k.stride(1), k.stride(2), vp + b * v.stride(0) + h * v.stride(1), v.stride(2), T, D,
               static_cast<float>(scale), s.data(), op + i * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(llmcore, CPU, m) { m.impl("decode_attention", decode_attention); }
