// Multi-head attention for training on CPU in fp32: forward and backward of softmax(q k^T / sqrt(D)) v, full or
// causal, for the short sequences of CPU training (the tiny preset: 128 tokens, 64 image queries).
//
// Why: on the tiny preset's shapes PyTorch's CPU flash-attention kernel, which SDPA picks for fp32 training, took
// ~6-7.5 ms per decoder layer for forward + backward of [8, 4, 128, 64] causal on a 2-core Zen 4 (~15 % of a training
// step), and SDPA's math path was no faster; here it is ~2.7 ms. One task per (batch row, head) keeps that head's keys
// in L1/L2: a block of 64 queries against all its keys is one score matrix (no online softmax), each product is one
// register-blocked AVX2 GEMM (~90 GFLOP/s per core), and causal blocks stop at their last allowed key.
//
// Like flash attention, the forward saves only the output and the log-sum-exp per query; the backward recomputes the
// probabilities. Sums are in fp32 in a different order than SDPA's, so results agree to rounding (~1e-6 relative).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx2_reduce.h"
#include "kernels.h"
#include "parallel_chunks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kQueryBlock = 64;  // queries per score matrix: 64 x keys fp32 stays in L2 up to ~2k keys

inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// ---- GEMM: C[M, N] (+)= sum_k A(i, k) B[k, n], A(i, k) = a[i * sai + k * sak] (broadcast), B row-major, N % 8 == 0.
// One tile is MR rows x 8*NV columns held in registers (6 x 16: 12 accumulators of the 16 AVX2 registers). The
// accumulators are named variables, not an array: GCC keeps an array of __m256 in registers but also stores it to
// the stack on every iteration (measured: 37 GFLOP/s on one core instead of ~90).
#define KOSMOS2_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int MR, int NV>
inline void gemm_tile(const float* a, int64_t sai, int64_t sak, const float* b, int64_t ldb, float* c, int64_t ldc,
                      int64_t K, bool accumulate) {
  static_assert(MR >= 1 && MR <= 6 && (NV == 1 || NV == 2), "tile of at most 6 x 16");
#define KOSMOS2_DECLARE(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
  KOSMOS2_ROWS(KOSMOS2_DECLARE)
#define KOSMOS2_LOAD(r)                                              \
  if constexpr (MR > r) {                                            \
    if (accumulate) {                                                \
      c##r##0 = _mm256_loadu_ps(c + r * ldc);                        \
      if constexpr (NV > 1) c##r##1 = _mm256_loadu_ps(c + r * ldc + 8); \
    }                                                                \
  }
  KOSMOS2_ROWS(KOSMOS2_LOAD)
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    const __m256 b0 = _mm256_loadu_ps(bk);
    const __m256 b1 = NV > 1 ? _mm256_loadu_ps(bk + 8) : b0;
    const float* ak = a + k * sak;
#define KOSMOS2_FMA(r)                                                   \
  if constexpr (MR > r) {                                                \
    const __m256 av = _mm256_broadcast_ss(ak + r * sai);                 \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);                          \
    if constexpr (NV > 1) c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);    \
  }
    KOSMOS2_ROWS(KOSMOS2_FMA)
  }
#define KOSMOS2_STORE(r)                                             \
  if constexpr (MR > r) {                                            \
    _mm256_storeu_ps(c + r * ldc, c##r##0);                          \
    if constexpr (NV > 1) _mm256_storeu_ps(c + r * ldc + 8, c##r##1); \
  }
  KOSMOS2_ROWS(KOSMOS2_STORE)
#undef KOSMOS2_DECLARE
#undef KOSMOS2_LOAD
#undef KOSMOS2_FMA
#undef KOSMOS2_STORE
}
#undef KOSMOS2_ROWS

template <int NV>
void gemm_panel(int64_t M, int64_t K, const float* a, int64_t sai, int64_t sak, const float* b, int64_t ldb, float* c,
                int64_t ldc, bool acc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) gemm_tile<6, NV>(a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, K, acc);
  const float* ai = a + i * sai;
  float* ci = c + i * ldc;
  switch (M - i) {
    case 5: gemm_tile<5, NV>(ai, sai, sak, b, ldb, ci, ldc, K, acc); break;
    case 4: gemm_tile<4, NV>(ai, sai, sak, b, ldb, ci, ldc, K, acc); break;
    case 3: gemm_tile<3, NV>(ai, sai, sak, b, ldb, ci, ldc, K, acc); break;
    case 2: gemm_tile<2, NV>(ai, sai, sak, b, ldb, ci, ldc, K, acc); break;
    case 1: gemm_tile<1, NV>(ai, sai, sak, b, ldb, ci, ldc, K, acc); break;
    default: break;
  }
}

// Column panels of 16 (one of 8 at the end): each panel of B (K x 16) is read from L1 by every row tile.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t sai, int64_t sak, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) gemm_panel<2>(M, K, a, sai, sak, b + n, ldb, c + n, ldc, accumulate);
  if (n < N) gemm_panel<1>(M, K, a, sai, sak, b + n, ldb, c + n, ldc, accumulate);
}

// ---- exp for x <= 0 (scores minus their maximum): Cephes' expf polynomial on r = x - n ln2, times 2^n; ~1 ulp.
// Inputs below -87.3 are clamped there (exp ~ 1e-38; masked entries are zeroed by the caller, not computed).
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
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
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

using kosmos2::horizontal_max;
using kosmos2::horizontal_sum;

// lanes j0..j0+7 that are < limit
inline __m256 lanes_below(int64_t j0, int64_t limit) {
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(limit)), index));
}

// p[j] = exp(scale * s[j] - shift) for j < limit, 0 for limit <= j < width (width % 8 == 0); returns the sum
inline float exp_row(float* s, int64_t limit, int64_t width, float scale, float shift) {
  const __m256 vs = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(shift);
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < width; j += 8) {
    if (j >= limit) { _mm256_storeu_ps(s + j, _mm256_setzero_ps()); continue; }
    __m256 p = exp_nonpositive(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vs, vshift));
    if (j + 8 > limit) p = _mm256_and_ps(p, lanes_below(j, limit));
    _mm256_storeu_ps(s + j, p);
    total = _mm256_add_ps(total, p);
  }
  return horizontal_sum(total);
}

inline float row_max(const float* s, int64_t limit) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= limit; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  float best = horizontal_max(m);
  for (; j < limit; ++j) best = std::max(best, s[j]);
  return best;
}

inline float dot(const float* x, const float* y, int64_t n) {  // n % 8 == 0
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d), acc);
  return horizontal_sum(acc);
}

// A [B, H, T, D] tensor with unit stride over D: the rows of head (b, h).
struct Heads {
  float* data;
  int64_t sb, sh, st;
  explicit Heads(const torch::Tensor& t)
      : data(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)) {}
  float* rows(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

struct Shape {
  int64_t B, H, Tq, Tk, D, ldk;  // ldk: keys rounded up to 8, the row length of the score and transposed buffers
  bool causal;                   // query i sees keys j <= i + (Tk - Tq) (lower-right aligned; Tq == Tk: plain causal)
  float scale;
  int64_t keys_for_row(int64_t i) const { return causal ? std::min(Tk, i + Tk - Tq + 1) : Tk; }
};

// 8 x 8 block of floats: src rows (stride ss) -> dst rows (stride ds), transposed
inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss), r2 = _mm256_loadu_ps(src + 2 * ss),
         r3 = _mm256_loadu_ps(src + 3 * ss), r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss),
         r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  r0 = _mm256_shuffle_ps(t0, t2, 0x44); r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  r2 = _mm256_shuffle_ps(t1, t3, 0x44); r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  r4 = _mm256_shuffle_ps(t4, t6, 0x44); r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  r6 = _mm256_shuffle_ps(t5, t7, 0x44); r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(r0, r4, 0x20));
  _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(r1, r5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(r2, r6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(r3, r7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(r0, r4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(r1, r5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(r2, r6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(r3, r7, 0x31));
}

// src rows [T, D] (stride st) -> dst [D, ldk], zero beyond T (D % 8 == 0)
void transpose_into(const float* src, int64_t st, int64_t T, int64_t D, int64_t ldk, float* dst) {
  int64_t t = 0;
  for (; t + 8 <= T; t += 8)
    for (int64_t d = 0; d < D; d += 8) transpose8x8(src + t * st + d, st, dst + d * ldk + t, ldk);
  for (int64_t d = 0; d < D; ++d) {
    float* out = dst + d * ldk;
    for (int64_t r = t; r < T; ++r) out[r] = src[r * st + d];
    std::fill(out + T, out + ldk, 0.f);
  }
}

// s [rows, ldk] = q rows i0.. x k^T over the block's keys, then each row turned into probabilities: with `lse`
// given, p = exp(scale s - lse) (the backward's recomputation); otherwise normalised by its own sum, and the row's
// log-sum-exp written to lse_out.
int64_t block_probabilities(const Shape& sh, const float* q, int64_t qst, const float* kt, int64_t i0, int64_t rows,
                            float* s, const float* lse, float* lse_out) {
  const int64_t kv_end = sh.keys_for_row(i0 + rows - 1), width = round_up8(kv_end);
  gemm(rows, width, sh.D, q + i0 * qst, qst, 1, kt, sh.ldk, s, sh.ldk, false);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * sh.ldk;
    const int64_t limit = sh.keys_for_row(i0 + r);
    if (lse != nullptr) {
      exp_row(row, limit, width, sh.scale, lse[i0 + r]);
      continue;
    }
    const float shift = sh.scale * row_max(row, limit);
    const float total = exp_row(row, limit, width, sh.scale, shift);
    const __m256 inv = _mm256_set1_ps(1.f / total);
    for (int64_t j = 0; j < width; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inv));
    lse_out[i0 + r] = shift + std::log(total);
  }
  return kv_end;
}

void forward_head(const Shape& sh, const float* q, int64_t qst, const float* k, int64_t kst, const float* v,
                  int64_t vst, float* o, int64_t ost, float* lse, float* kt, float* s) {
  transpose_into(k, kst, sh.Tk, sh.D, sh.ldk, kt);
  for (int64_t i0 = 0; i0 < sh.Tq; i0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, sh.Tq - i0);
    const int64_t kv_end = block_probabilities(sh, q, qst, kt, i0, rows, s, nullptr, lse);
    gemm(rows, sh.D, kv_end, s, sh.ldk, 1, v, vst, o + i0 * ost, ost, false);  // o = p v
  }
}

void zero_rows(float* x, int64_t st, int64_t T, int64_t D) {
  for (int64_t t = 0; t < T; ++t) std::fill(x + t * st, x + t * st + D, 0.f);
}

// dS = P (dP - rowsum(dO o)) scale; dq = dS k, dk += dS^T q, dv += P^T dO (the softmax backward, per query block)
void backward_head(const Shape& sh, const float* q, int64_t qst, const float* k, int64_t kst, const float* v,
                   int64_t vst, const float* o, int64_t ost, const float* go, int64_t gost, const float* lse, float* dq,
                   int64_t dqst, float* dk, int64_t dkst, float* dv, int64_t dvst, float* kt, float* vt, float* p,
                   float* dp) {
  transpose_into(k, kst, sh.Tk, sh.D, sh.ldk, kt);
  transpose_into(v, vst, sh.Tk, sh.D, sh.ldk, vt);
  zero_rows(dk, dkst, sh.Tk, sh.D);
  zero_rows(dv, dvst, sh.Tk, sh.D);
  const __m256 vscale = _mm256_set1_ps(sh.scale);
  for (int64_t i0 = 0; i0 < sh.Tq; i0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, sh.Tq - i0);
    const int64_t kv_end = block_probabilities(sh, q, qst, kt, i0, rows, p, lse, nullptr);
    const int64_t width = round_up8(kv_end);
    const float* go_blk = go + i0 * gost;
    gemm(kv_end, sh.D, rows, p, 1, sh.ldk, go_blk, gost, dv, dvst, true);             // dv += P^T dO
    gemm(rows, width, sh.D, go_blk, gost, 1, vt, sh.ldk, dp, sh.ldk, false);          // dP = dO v^T
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 delta = _mm256_set1_ps(dot(go_blk + r * gost, o + (i0 + r) * ost, sh.D));
      const float* pr = p + r * sh.ldk;
      float* dr = dp + r * sh.ldk;
      for (int64_t j = 0; j < width; j += 8) {
        const __m256 ds = _mm256_mul_ps(_mm256_loadu_ps(pr + j), _mm256_sub_ps(_mm256_loadu_ps(dr + j), delta));
        _mm256_storeu_ps(dr + j, _mm256_mul_ps(ds, vscale));
      }
    }
    gemm(rows, sh.D, kv_end, dp, sh.ldk, 1, k, kst, dq + i0 * dqst, dqst, false);     // dq = dS k
    gemm(kv_end, sh.D, rows, dp, 1, sh.ldk, q + i0 * qst, qst, dk, dkst, true);       // dk += dS^T q
  }
}

Shape check_and_shape(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool causal,
                      const char* who) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->dim() == 4 && t->stride(3) == 1,
                who, ": q, k, v must be fp32 CPU tensors [B, H, T, D] with unit stride over D");
  }
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && v.size(2) == Tk &&
              k.size(3) == D && v.size(3) == D, who, ": q [B, H, Tq, D], k and v [B, H, Tk, D] disagree in shape");
  TORCH_CHECK(D % 8 == 0 && D > 0, who, ": the head size must be a multiple of 8, got ", D);
  TORCH_CHECK(Tq > 0 && Tk > 0, who, ": empty query or key sequence");
  TORCH_CHECK(!causal || Tk >= Tq, who, ": causal attention needs at least as many keys as queries (", Tk, " < ", Tq,
              ")");
  return Shape{B, H, Tq, Tk, D, round_up8(Tk), causal, 1.f / std::sqrt(static_cast<float>(D))};
}

// Per-thread scratch buffer `slot` (0..3) of at least n floats, kept between calls: the (row, head) tasks of one call
// and successive layers reuse the same warm memory instead of allocating.
float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// [B, H, T, D] tensor whose memory is [B, T, H, D]: the layout of `y.view(B, T, H, D).transpose(1, 2)` in the model,
// so that transposing back and merging the heads is free
torch::Tensor heads_last(const torch::Tensor& like, int64_t T) {
  return torch::empty({like.size(0), T, like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

}  // namespace

// Returns (out [B, H, Tq, D] in [B, Tq, H, D] memory, lse [B, H, Tq] fp32).
std::vector<torch::Tensor> train_attention_forward(const torch::Tensor& q, const torch::Tensor& k,
                                                   const torch::Tensor& v, bool causal) {
  const Shape sh = check_and_shape(q, k, v, causal, "train_attention_forward");
  torch::Tensor out = heads_last(q, sh.Tq);
  torch::Tensor lse = torch::empty({sh.B, sh.H, sh.Tq}, q.options());
  const Heads Q(q), K(k), V(v), O(out);
  float* lse_data = lse.data_ptr<float>();
  kosmos2::parallel_chunks(sh.B * sh.H, [&](int64_t t) {
    float *kt = scratch(0, sh.D * sh.ldk), *s = scratch(1, kQueryBlock * sh.ldk);
    const int64_t b = t / sh.H, h = t % sh.H;
    forward_head(sh, Q.rows(b, h), Q.st, K.rows(b, h), K.st, V.rows(b, h), V.st, O.rows(b, h), O.st,
                 lse_data + t * sh.Tq, kt, s);
  });
  return {out, lse};
}

// Returns (dq, dk, dv), each [B, H, T, D] in [B, T, H, D] memory.
std::vector<torch::Tensor> train_attention_backward(const torch::Tensor& grad_out, const torch::Tensor& q,
                                                    const torch::Tensor& k, const torch::Tensor& v,
                                                    const torch::Tensor& out, const torch::Tensor& lse, bool causal) {
  const Shape sh = check_and_shape(q, k, v, causal, "train_attention_backward");
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(3) == 1 && out.scalar_type() == torch::kFloat32,
              "train_attention_backward: out must be the forward's output");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == sh.B * sh.H * sh.Tq && lse.scalar_type() == torch::kFloat32,
              "train_attention_backward: lse must be the forward's contiguous [B, H, Tq] log-sum-exp");
  const torch::Tensor go = grad_out.stride(3) == 1 ? grad_out : grad_out.contiguous();
  TORCH_CHECK(go.sizes() == q.sizes() && go.scalar_type() == torch::kFloat32,
              "train_attention_backward: grad_out must be fp32 with the output's shape");
  torch::Tensor dq = heads_last(q, sh.Tq), dk = heads_last(k, sh.Tk), dv = heads_last(v, sh.Tk);
  const Heads Q(q), K(k), V(v), O(out), G(go), DQ(dq), DK(dk), DV(dv);
  const float* lse_data = lse.data_ptr<float>();
  kosmos2::parallel_chunks(sh.B * sh.H, [&](int64_t t) {
    float *kt = scratch(0, sh.D * sh.ldk), *vt = scratch(1, sh.D * sh.ldk), *p = scratch(2, kQueryBlock * sh.ldk),
          *dp = scratch(3, kQueryBlock * sh.ldk);
    const int64_t b = t / sh.H, h = t % sh.H;
    backward_head(sh, Q.rows(b, h), Q.st, K.rows(b, h), K.st, V.rows(b, h), V.st, O.rows(b, h), O.st, G.rows(b, h),
                  G.st, lse_data + t * sh.Tq, DQ.rows(b, h), DQ.st, DK.rows(b, h), DK.st, DV.rows(b, h), DV.st, kt, vt,
                  p, dp);
  });
  return {dq, dk, dv};
}
