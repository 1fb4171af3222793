// One decoding step of self-attention on CPU, fused: append this token's key/value to the fp32 KV cache and attend
// with its single query over everything cached, for every (row, head) at once.
//
// Why: at batch 1 a decode step's attention is tiny (xl: 32 heads x ~80 keys x 64 dims), yet in PyTorch it is seven
// ops per layer (two cache writes with a dtype conversion, a query conversion, SDPA, transpose, reshape, conversion
// back), and right after a weight-streaming GEMV each of them runs cold: measured on a 2-core Zen 4, SDPA alone took
// ~6 ms of a ~112 ms xl bf16 step (24 calls). Here it is one call. The arithmetic is SDPA's math path in fp32:
// softmax(q k^T / sqrt(D)) v with the max subtracted, keys that are masked out skipped.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "decode_attention.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// One (row, head): q [D] -> out [D]; keys/values [T, D] fp32; allowed [T] (nullptr = all); scratch: qf and acc [D],
// scores [T]
template <typename T>
void attend_one(const T* q, const float* keys, const float* values, const bool* allowed, int64_t steps, int64_t D,
                float scale, T* out, float* qf, float* scores, float* acc) {
  for (int64_t d = 0; d < D; ++d) qf[d] = to_float(q[d]) * scale;
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < steps; ++t) {
    if (allowed != nullptr && !allowed[t]) { scores[t] = -std::numeric_limits<float>::infinity(); continue; }
    const float* k = keys + t * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += qf[d] * k[d];
    scores[t] = s;
    max_score = std::max(max_score, s);
  }
  float total = 0.f;
  for (int64_t t = 0; t < steps; ++t) {
    const float p = std::isinf(scores[t]) && scores[t] < 0 ? 0.f : std::exp(scores[t] - max_score);
    scores[t] = p;
    total += p;
  }
  std::fill(acc, acc + D, 0.f);
  for (int64_t t = 0; t < steps; ++t) {
    const float p = scores[t];
    if (p == 0.f) continue;
    const float* v = values + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += p * v[d];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;  // no allowed key at all: zeros rather than NaN
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inv);
}

}  // namespace

namespace kosmos2 {

template <typename T>
void decode_attention_rows(const T* q, const T* k, const T* v, int64_t ld, float* key_cache, float* value_cache,
                           int64_t B, int64_t H, int64_t capacity, int64_t D, int64_t start, const bool* allowed, T* y,
                           int64_t ldy) {
  const int64_t steps = start + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // heads are independent: one task per (row, head); grain 4 keeps small batches on few threads
  at::parallel_for(0, B * H, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(steps), acc(D), qf(D);  // per task, reused for its heads
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      float* keys = key_cache + (b * H + h) * capacity * D;
      float* values = value_cache + (b * H + h) * capacity * D;
      const int64_t src = b * ld + h * D;
      for (int64_t d = 0; d < D; ++d) {
        keys[start * D + d] = to_float(k[src + d]);
        values[start * D + d] = to_float(v[src + d]);
      }
      attend_one<T>(q + src, keys, values, allowed == nullptr ? nullptr : allowed + b * steps, steps, D, scale,
                    y + b * ldy + h * D, qf.data(), scores.data(), acc.data());
    }
  });
}

template void decode_attention_rows<float>(const float*, const float*, const float*, int64_t, float*, float*, int64_t,
                                           int64_t, int64_t, int64_t, int64_t, const bool*, float*, int64_t);
template void decode_attention_rows<at::BFloat16>(const at::BFloat16*, const at::BFloat16*, const at::BFloat16*,
                                                  int64_t, float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                  const bool*, at::BFloat16*, int64_t);

void check_caches(const torch::Tensor& key_cache, const torch::Tensor& value_cache, int64_t start, const char* who) {
  TORCH_CHECK(key_cache.device().is_cpu() && key_cache.scalar_type() == torch::kFloat32 && key_cache.dim() == 4 &&
              key_cache.is_contiguous() && value_cache.sizes() == key_cache.sizes() &&
              value_cache.scalar_type() == torch::kFloat32 && value_cache.is_contiguous(),
              who, ": the caches must be contiguous fp32 CPU tensors [B, H, capacity, D] of equal shape");
  TORCH_CHECK(start >= 0 && start < key_cache.size(2), who, ": position ", start, " is outside the cache (capacity ",
              key_cache.size(2), ")");
}

const bool* checked_allowed(const c10::optional<torch::Tensor>& allowed, int64_t B, int64_t start, torch::Tensor& keep,
                            const char* who) {
  if (!allowed.has_value() || !allowed->defined()) return nullptr;
  keep = allowed->contiguous();
  TORCH_CHECK(keep.scalar_type() == torch::kBool && keep.dim() == 2 && keep.size(0) == B && keep.size(1) == start + 1,
              who, ": allowed must be bool [B, start + 1]");
  return keep.data_ptr<bool>();
}

}  // namespace kosmos2

namespace {

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& key_cache,
         torch::Tensor& value_cache, int64_t start, const bool* allowed, torch::Tensor& y) {
  const int64_t B = key_cache.size(0), H = key_cache.size(1), capacity = key_cache.size(2), D = key_cache.size(3);
  kosmos2::decode_attention_rows<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), H * D,
                                    key_cache.data_ptr<float>(), value_cache.data_ptr<float>(), B, H, capacity, D,
                                    start, allowed, y.data_ptr<T>(), H * D);
}

}  // namespace

// q, k, v: [B, H*D] (this step's projections, bf16 or fp32); key_cache, value_cache: [B, H, capacity, D] fp32,
// written at position `start`; allowed: optional [B, start + 1] bool (True = may attend). Returns [B, H*D] in q's dtype.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               torch::Tensor key_cache, torch::Tensor value_cache, int64_t start,
                               const c10::optional<torch::Tensor>& allowed) {
  kosmos2::check_caches(key_cache, value_cache, start, "decode_attention");
  const int64_t B = key_cache.size(0), H = key_cache.size(1), D = key_cache.size(3);
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->size(0) == B && t->size(1) == H * D && t->is_contiguous() &&
                t->scalar_type() == q.scalar_type(),
                "decode_attention: q, k, v must be contiguous [B, H*D] CPU tensors of one dtype");
  }
  torch::Tensor allowed_c;
  const bool* allowed_ptr = kosmos2::checked_allowed(allowed, B, start, allowed_c, "decode_attention");
  torch::Tensor y = torch::empty_like(q);
  if (q.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16>(q, k, v, key_cache, value_cache, start, allowed_ptr, y);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32, "decode_attention: q, k, v must be bf16 or fp32");
    run<float>(q, k, v, key_cache, value_cache, start, allowed_ptr, y);
  }
  return y;
}
