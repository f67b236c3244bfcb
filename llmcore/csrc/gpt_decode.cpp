// One decoding step of llmcore's GPT (llmcore.model.GPTModel) with int8 weight-only layers
// (llmcore.quantize.Int8Linear, packed for int8_linear.cpp's kernel), batch 1, as one C++ call:
// embedding, every block (LayerNorm, qkv, attention over the KV cache, output projection,
// LayerNorm, GELU feed-forward, the residual sums) and the final norm and vocabulary head.
//
// Why one call: a step of GPT-2 small reads its 125 MB of int8 weights in 49 matrix-vector
// products, ~2 ms at ~60 GB/s, and AOTInductor's compiled step spends 0.7-1 ms more between them
// (two threads forked and joined for each kernel, the small fused kernels, the attention). Here
// the threads are forked once per step and meet at 4 barriers per block; LayerNorm and the
// quantization of its output are repeated by every thread (768 values: cheaper than a barrier);
// each thread computes the q, k and v rows of its own heads, so the attention of those heads
// follows without a barrier; GELU and the residual sums are applied to each block of 16 outputs
// as it is computed. The arithmetic is the int8 kernel's (int8_block.h) and the decoding
// attention's (attention_head.h); LayerNorm's moments are summed in 16 fp32 lanes; GELU's tanh is
// (1 - e) / (1 + e), e = exp(-2|u|), on AVX-512 (absolute error ~1e-7 in fp32, tanhf's ~6e-8;
// the 15-bit quantization of GELU's output that follows steps by ~3e-5 of its largest value),
// tanhf elsewhere.
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>
#include <torch/types.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "attention_head.h"
#include "int8_block.h"

namespace {

using namespace llmcore_int8;

struct Linear {  // an Int8Linear: packed int8 weights (blocks, pairs, 16, 2), scales, optional bias
  const int8_t* w = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t out = 0, pairs = 0;
};

struct Norm {
  const float* w = nullptr;
  const float* b = nullptr;
};

struct Block {
  Norm norm1, norm2;
  Linear qkv, out_proj, fc, proj;
};

// The threads of a step meet ~50 times (4 barriers a block). This barrier is a counter and a
// generation number: the last thread to arrive starts the next generation; the others spin on it,
// and yield the core after 20,000 pauses (some hundreds of us: a thread descheduled by a busy
// machine). With OpenMP's barrier instead, GPT-2 small's steps took 3% longer (50 paired runs).
class SpinBarrier {
 public:
  explicit SpinBarrier(int threads) : threads_(threads) {}
  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < 20000)
        pause();
      else
        std::this_thread::yield();
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }
  const int threads_;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
};

enum class Epilogue { kStore, kAddTo, kGelu };

inline float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + std::tanh(u));
}

// y = epilogue(acc * sx * scale + bias) for the outputs n0 + j, j in [j0, j1), of one block.
inline void finish_block(const Linear& L, int64_t n0, int64_t j0, int64_t j1, const float* acc, float sx, Epilogue how,
                         float* y) {
  float v[kRows];
  for (int64_t j = 0; j < kRows; ++j) {
    const int64_t n = std::min(n0 + j, L.out - 1);
    v[j] = acc[j] * sx * L.scale[n] + (L.bias ? L.bias[n] : 0.f);
  }
  if (how == Epilogue::kGelu) {
#if defined(__AVX512F__)
    // tanh(u) = sign(u) (1 - e^-2|u|) / (1 + e^-2|u|)
    const __m512 x = _mm512_loadu_ps(v);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
    const __m512 au = _mm512_abs_ps(u);
    const __m512 e = llmcore_attention::exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.f), au));
    __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), e), _mm512_add_ps(_mm512_set1_ps(1.f), e));
    t = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t),
                                            _mm512_and_si512(_mm512_castps_si512(u), _mm512_set1_epi32(INT32_MIN))));
    _mm512_storeu_ps(v, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), t)));
#else
    for (int64_t j = 0; j < kRows; ++j) v[j] = gelu_tanh(v[j]);
#endif
  }
  for (int64_t j = j0; j < j1; ++j) {
    if (how == Epilogue::kAddTo)
      y[n0 + j] += v[j];
    else
      y[n0 + j] = v[j];
  }
}

// Outputs [r0, r1) of L times one quantized row xq (scale sx), through the epilogue into y.
inline void matvec_rows(const Linear& L, const int32_t* xq, float sx, int64_t r0, int64_t r1, Epilogue how, float* y) {
  float acc[kRows];
  for (int64_t b = r0 / kRows; b * kRows < r1; ++b) {
    block_dot(xq, L.pairs, 1, L.w + b * L.pairs * 2 * kRows, L.pairs, acc);
    const int64_t n0 = b * kRows;
    finish_block(L, n0, std::max<int64_t>(r0 - n0, 0), std::min<int64_t>(r1 - n0, kRows), acc, sx, how, y);
  }
}

// Thread t's share of L's outputs below `limit`, whole blocks of 16.
inline void matvec_share(const Linear& L, const int32_t* xq, float sx, int t, int nt, int64_t limit, Epilogue how,
                         float* y) {
  const int64_t blocks = (limit + kRows - 1) / kRows;
  const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
  if (b1 > b0) matvec_rows(L, xq, sx, b0 * kRows, std::min(limit, b1 * kRows), how, y);
}

// LayerNorm of one row: its moments summed in 16 fp32 lanes (plain loops without AVX-512).
inline void layer_norm(const float* x, const Norm& norm, int64_t E, float eps, float* out) {
  float sum = 0.f, sq = 0.f;
  int64_t e = 0;
#if defined(__AVX512F__)
  const int64_t vec = E - E % 16;
  __m512 acc = _mm512_setzero_ps();
  for (; e < vec; e += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + e));
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; e < E; ++e) sum += x[e];
  const float mean = sum / static_cast<float>(E);
  e = 0;
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mean);
  acc = _mm512_setzero_ps();
  for (; e < vec; e += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + e), m);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  sq = _mm512_reduce_add_ps(acc);
#endif
  for (; e < E; ++e) sq += (x[e] - mean) * (x[e] - mean);
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(E) + eps);
  e = 0;
#if defined(__AVX512F__)
  const __m512 r = _mm512_set1_ps(rstd);
  for (; e < vec; e += 16) {
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + e), m), r);
    _mm512_storeu_ps(out + e, _mm512_fmadd_ps(d, _mm512_loadu_ps(norm.w + e), _mm512_loadu_ps(norm.b + e)));
  }
#endif
  for (; e < E; ++e) out[e] = (x[e] - mean) * rstd * norm.w[e] + norm.b[e];
}

// The index of the largest of y[r0..r1) (the first of equal ones; the first NaN if there is one,
// as numpy's argmax), and its value; r1 > r0.
inline std::pair<int64_t, float> first_max(const float* y, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i)
    if (std::isnan(y[i])) return {i, y[i]};
  float best = y[r0];
  int64_t i = r0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(best);
  for (; i + 16 <= r1; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(y + i));
  best = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < r1; ++i) best = std::max(best, y[i]);
  for (i = r0; y[i] != best; ++i) {
  }
  return {i, best};
}

class GptDecoder : public torch::CustomClassHolder {
 public:
  // tensors: tok_emb, pos_emb, final norm weight and bias, head packed weights and scales, then per
  // block: norm1 weight, bias; qkv packed, scale, bias; out_proj packed, scale, bias; norm2 weight,
  // bias; fc packed, scale, bias; proj packed, scale, bias (an absent bias: an empty tensor).
  // dims: n_layers, n_heads, vocab_size (the logits returned).
  GptDecoder(std::vector<torch::Tensor> tensors, std::vector<int64_t> dims, double eps)
      : tensors_(std::move(tensors)), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(dims.size() == 3, "gpt_decode: dims must be (n_layers, n_heads, vocab_size)");
    n_layers_ = dims[0], n_heads_ = dims[1], vocab_ = dims[2];
    TORCH_CHECK(tensors_.size() == 6 + 16 * static_cast<size_t>(n_layers_), "gpt_decode: expected ",
                6 + 16 * n_layers_, " tensors for ", n_layers_, " blocks, got ", tensors_.size());
    const auto& tok = tensors_[0];
    emb_ = tok.dim() == 2 ? tok.size(1) : 0;
    TORCH_CHECK(emb_ > 0 && n_heads_ > 0 && emb_ % n_heads_ == 0, "gpt_decode: tok_emb must be (vocab, emb_dim) with emb_dim a multiple of n_heads");
    head_dim_ = emb_ / n_heads_;
    tok_ = floats(0, "tok_emb", -1), pos_ = floats(1, "pos_emb", -1);
    TORCH_CHECK(tensors_[1].dim() == 2 && tensors_[1].size(1) == emb_, "gpt_decode: pos_emb must be (context, ", emb_, ")");
    final_norm_ = {floats(2, "final norm weight", emb_), floats(3, "final norm bias", emb_)};
    head_ = linear(4, "head", emb_, false);
    TORCH_CHECK(vocab_ > 0 && vocab_ <= head_.out && vocab_ <= tok.size(0), "gpt_decode: vocab_size ", vocab_, " exceeds the head's or the embedding's rows");
    for (int64_t l = 0; l < n_layers_; ++l) {
      const size_t i = 6 + 16 * l;
      const std::string name = "block " + std::to_string(l) + " ";
      Block b;
      b.norm1 = {floats(i, name + "norm1 weight", emb_), floats(i + 1, name + "norm1 bias", emb_)};
      b.qkv = linear(i + 2, name + "qkv", emb_, true, 3 * emb_);
      b.out_proj = linear(i + 5, name + "out_proj", emb_, true, emb_);
      b.norm2 = {floats(i + 8, name + "norm2 weight", emb_), floats(i + 9, name + "norm2 bias", emb_)};
      b.fc = linear(i + 10, name + "fc", emb_, true, l == 0 ? -1 : blocks_[0].fc.out);  // one hidden size
      b.proj = linear(i + 13, name + "proj", b.fc.out, true, emb_);
      blocks_.push_back(b);
    }
  }

  // The layers' KV caches, (1, n_heads, columns, head_dim) each, contiguous; a step writes column pos.
  void set_caches(std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values) {
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == n_layers_ && static_cast<int64_t>(values.size()) == n_layers_,
                "gpt_decode: one key and one value cache per block expected");
    int64_t columns = -1;
    for (const auto* list : {&keys, &values})
      for (const auto& c : *list) {
        TORCH_CHECK(c.scalar_type() == torch::kFloat && c.device().is_cpu() && c.dim() == 4 && c.size(0) == 1 &&
                        c.size(1) == n_heads_ && c.size(3) == head_dim_ && c.is_contiguous(),
                    "gpt_decode: a KV cache must be contiguous fp32 (1, ", n_heads_, ", columns, ", head_dim_, "), got ", c.sizes());
        TORCH_CHECK(columns < 0 || c.size(2) == columns, "gpt_decode: the KV caches differ in length");
        columns = c.size(2);
      }
    keys_ = std::move(keys), values_ = std::move(values), columns_ = columns;
  }

  // The logits (1, vocab_size) of `token` at position `pos`; its key and value go to column pos.
  torch::Tensor step(int64_t token, int64_t pos) {
    auto logits = torch::empty({1, vocab_}, torch::kFloat);
    run(token, pos, logits.data_ptr<float>(), nullptr);
    return logits;
  }

  // As step, but the id of the largest logit (greedy decoding: the first of equal maxima).
  int64_t step_greedy(int64_t token, int64_t pos) {
    int64_t best = 0;
    greedy_logits_.resize(vocab_);
    run(token, pos, greedy_logits_.data(), &best);
    return best;
  }

  // Up to `count` greedy tokens after `token` at `pos` (the next at pos + 1, ...), stopping after
  // `eos` (none if negative): a few steps per call from Python, whose ~50 us between two steps
  // (cold caches after each step's 125 MB) was 2% of GPT-2 small's int8 step.
  std::vector<int64_t> generate_greedy(int64_t token, int64_t pos, int64_t count, int64_t eos) {
    std::vector<int64_t> ids;
    for (int64_t i = 0; i < count && (ids.empty() || ids.back() != eos); ++i)
      ids.push_back(step_greedy(ids.empty() ? token : ids.back(), pos + i));
    return ids;
  }

 private:
  // One step: the logits into `out` (vocab_size values), and their first maximum into *argmax if given.
  void run(int64_t token, int64_t pos, float* out, int64_t* argmax) {
    TORCH_CHECK(token >= 0 && token < tensors_[0].size(0), "gpt_decode: token id ", token, " is outside the embedding's ", tensors_[0].size(0), " rows");
    TORCH_CHECK(pos >= 0 && pos < columns_ && pos < tensors_[1].size(0), "gpt_decode: position ", pos,
                " is outside the KV cache (", columns_, " columns) or the position embedding");
    const int64_t E = emb_, H = n_heads_, D = head_dim_;
    std::vector<float> x(E), qkv(3 * E), att(E), hidden(blocks_.empty() ? 0 : blocks_[0].fc.out);
    for (int64_t e = 0; e < E; ++e) x[e] = tok_[token * E + e] + pos_[pos * E + e];
    const float scale = static_cast<float>(std::pow(static_cast<double>(D), -0.5));
    const int threads = at::get_num_threads();
    std::vector<std::pair<int64_t, float>> maxima(threads, {-1, 0.f});
    std::optional<SpinBarrier> team;  // for the team OpenMP gives (fewer threads when nested)
#pragma omp parallel num_threads(threads)
    {
      const int nt = omp_get_num_threads(), t = omp_get_thread_num();
#pragma omp single
      team.emplace(nt);  // (single ends with a barrier: every thread sees it)
      SpinBarrier& barrier = *team;
      const int64_t h0 = H * t / nt, h1 = H * (t + 1) / nt;
      const int64_t max_pairs = std::max(head_.pairs, hidden.empty() ? 0 : blocks_[0].proj.pairs);
      std::vector<float> normed(E), scores(pos + 1);
      std::vector<int32_t> xq(max_pairs);
      for (int64_t l = 0; l < n_layers_; ++l) {
        const Block& b = blocks_[l];
        layer_norm(x.data(), b.norm1, E, eps_, normed.data());
        float sx = quantize_row(normed.data(), E, b.qkv.pairs, xq.data());
        for (int64_t part = 0; part < 3; ++part)  // this thread's heads' q, k and v rows
          matvec_rows(b.qkv, xq.data(), sx, part * E + h0 * D, part * E + h1 * D, Epilogue::kStore, qkv.data());
        float* kc = keys_[l].data_ptr<float>();
        float* vc = values_[l].data_ptr<float>();
        for (int64_t h = h0; h < h1; ++h) {
          float* kh = kc + h * columns_ * D;
          float* vh = vc + h * columns_ * D;
          std::copy_n(qkv.data() + E + h * D, D, kh + pos * D);
          std::copy_n(qkv.data() + 2 * E + h * D, D, vh + pos * D);
          llmcore_attention::one_head(qkv.data() + h * D, kh, D, vh, D, pos + 1, D, scale, scores.data(), att.data() + h * D);
        }
        barrier.wait();
        sx = quantize_row(att.data(), E, b.out_proj.pairs, xq.data());
        matvec_share(b.out_proj, xq.data(), sx, t, nt, E, Epilogue::kAddTo, x.data());
        barrier.wait();
        layer_norm(x.data(), b.norm2, E, eps_, normed.data());
        sx = quantize_row(normed.data(), E, b.fc.pairs, xq.data());
        matvec_share(b.fc, xq.data(), sx, t, nt, b.fc.out, Epilogue::kGelu, hidden.data());
        barrier.wait();
        sx = quantize_row(hidden.data(), b.fc.out, b.proj.pairs, xq.data());
        matvec_share(b.proj, xq.data(), sx, t, nt, E, Epilogue::kAddTo, x.data());
        barrier.wait();
      }
      layer_norm(x.data(), final_norm_, E, eps_, normed.data());
      const float sx = quantize_row(normed.data(), E, head_.pairs, xq.data());
      matvec_share(head_, xq.data(), sx, t, nt, vocab_, Epilogue::kStore, out);
      const int64_t blocks = (vocab_ + kRows - 1) / kRows;
      const int64_t r0 = blocks * t / nt * kRows, r1 = std::min(vocab_, blocks * (t + 1) / nt * kRows);
      if (argmax && r1 > r0) maxima[t] = first_max(out, r0, r1);
    }
    if (argmax) {  // the threads' shares in order: the first of equal maxima, or the first NaN
      std::pair<int64_t, float> best{-1, 0.f};
      for (const auto& m : maxima) {
        if (m.first < 0 || std::isnan(best.second)) continue;
        if (best.first < 0 || std::isnan(m.second) || m.second > best.second) best = m;
      }
      *argmax = best.first;
    }
  }

  const float* floats(size_t i, const std::string& name, int64_t numel) {
    const auto& t = tensors_[i];
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.device().is_cpu() && t.is_contiguous() && (numel < 0 || t.numel() == numel),
                "gpt_decode: ", name, " must be contiguous fp32 on the CPU", numel < 0 ? "" : " with " + std::to_string(numel) + " values",
                ", got ", t.scalar_type(), " ", t.sizes());
    return t.data_ptr<float>();
  }

  // An Int8Linear at tensors i (packed), i + 1 (scale), i + 2 (bias, if with_bias) with `in` inputs.
  Linear linear(size_t i, const std::string& name, int64_t in, bool with_bias, int64_t out = -1) {
    const auto& w = tensors_[i];
    TORCH_CHECK(w.scalar_type() == torch::kChar && w.dim() == 4 && w.size(2) == kRows && w.size(3) == 2 && w.is_contiguous() &&
                    w.size(1) % 2 == 0 && 2 * w.size(1) >= in,
                "gpt_decode: ", name, " weights must be packed int8 (blocks, pairs, 16, 2) for ", in, " inputs, got ", w.sizes());
    Linear L;
    L.w = w.data_ptr<int8_t>();
    L.pairs = w.size(1);
    L.out = tensors_[i + 1].numel();
    L.scale = floats(i + 1, name + " scale", -1);
    TORCH_CHECK(L.out > 0 && L.out <= w.size(0) * kRows && (out < 0 || L.out == out), "gpt_decode: ", name, " has ", L.out, " outputs",
                out < 0 ? "" : ", expected " + std::to_string(out));
    if (with_bias && tensors_[i + 2].numel() > 0) L.bias = floats(i + 2, name + " bias", L.out);
    return L;
  }

  std::vector<torch::Tensor> tensors_, keys_, values_;
  std::vector<float> greedy_logits_;
  std::vector<Block> blocks_;
  Norm final_norm_;
  Linear head_;
  const float* tok_ = nullptr;
  const float* pos_ = nullptr;
  float eps_;
  int64_t n_layers_ = 0, n_heads_ = 0, vocab_ = 0, emb_ = 0, head_dim_ = 0, columns_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  m.class_<GptDecoder>("GptDecoder")
      .def(torch::init<std::vector<torch::Tensor>, std::vector<int64_t>, double>())
      .def("set_caches", &GptDecoder::set_caches)
      .def("step", &GptDecoder::step)
      .def("step_greedy", &GptDecoder::step_greedy)
      .def("generate_greedy", &GptDecoder::generate_greedy);
}
