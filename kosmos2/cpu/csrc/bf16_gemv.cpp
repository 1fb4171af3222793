// y = x @ W^T for a bf16 weight W [N, K] and a few rows of x [M, K] (M <= 8: decoding steps), on x86 CPUs.
//
// Why: decoding streams every weight once per step, so its speed is memory bandwidth / bytes of weights.
// - AVX2 + FMA (no bf16 instructions): PyTorch's bf16 GEMV reaches ~12 GB/s on our AVX2 host (it converts through
//   generic code), while this loop streams the weight at ~20 GB/s: a bf16 value is the top half of an fp32, so
//   widening is one unpack with zeros, and the x values are pre-shuffled to match the unpack's lane order.
// - AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids): one vdpbf16ps multiplies 32 bf16 pairs into fp32 sums, so a
//   bf16 x needs no conversion at all; with enough weight rows in flight this streams ~5 % faster than PyTorch's
//   (oneDNN's) bf16 GEMV at batch 1 and ~1.4x faster at batch 8, where oneDNN's plain-layout path re-blocks.
// Accumulation is fp32 in both, like PyTorch's bf16 matmul; the caller rounds the result.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx2_reduce.h"
#include "kernels.h"
#include "vnni_gemv.h"

#include <algorithm>
#include <vector>

namespace {

// Lane order of widened bf16 chunks of 16: unpacklo(0, w) = w[0..3, 8..11], unpackhi(0, w) = w[4..7, 12..15]
void shuffle_like_unpack(const float* x, float* out, int64_t K) {
  for (int64_t c = 0; c < K; c += 16) {
    for (int i = 0; i < 4; ++i) {
      out[c + i] = x[c + i];
      out[c + 4 + i] = x[c + 8 + i];
      out[c + 8 + i] = x[c + 4 + i];
      out[c + 12 + i] = x[c + 12 + i];
    }
  }
}

using kosmos2::horizontal_sum;

// Output columns [n0, n1) for M rows of x, R weight rows per pass; every weight byte is read once for all M rows.
// The accumulators must fit the 16 ymm registers with the widened weights and x: SPLIT keeps separate accumulators
// for the two halves of a chunk (shorter FMA dependency chains, for M = 2), otherwise both halves add into one.
// At M = 1, four weight rows in flight stream ~10 % faster than two (more memory requests outstanding).
template <int M, int R, bool SPLIT>
void gemv_columns(const uint16_t* W, const float* xs, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int H = SPLIT ? 2 : 1;
  const __m256i zero = _mm256_setzero_si256();
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[M][R][H];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < H; ++h) acc[m][r][h] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __m256 lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + (n + r) * K + k));
        lo[r] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w));
        hi[r] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w));
      }
      for (int m = 0; m < M; ++m) {
        const __m256 xlo = _mm256_loadu_ps(xs + m * K + k), xhi = _mm256_loadu_ps(xs + m * K + k + 8);
        for (int r = 0; r < R; ++r) {
          acc[m][r][0] = _mm256_fmadd_ps(lo[r], xlo, acc[m][r][0]);
          acc[m][r][H - 1] = _mm256_fmadd_ps(hi[r], xhi, acc[m][r][H - 1]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        y[m * N + n + r] = horizontal_sum(SPLIT ? _mm256_add_ps(acc[m][r][0], acc[m][r][H - 1]) : acc[m][r][0]);
  }
  if (n < n1) gemv_columns<M, 1, SPLIT>(W, xs, y, K, N, n, n1);  // the last R - 1 columns at most
}

using Columns = void (*)(const uint16_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
const Columns kColumns[] = {nullptr,
                            gemv_columns<1, 4, false>, gemv_columns<2, 2, true>,
                            gemv_columns<3, 2, false>, gemv_columns<4, 2, false>,
                            gemv_columns<5, 1, false>, gemv_columns<6, 1, false>,
                            gemv_columns<7, 1, false>, gemv_columns<8, 1, false>};

// ---- AVX512-BF16 path (compiled for any x86 CPU, called only where the CPU reports avx512bf16)

// Output columns [n0, n1) for M bf16 rows of x, R weight rows in flight. One vdpbf16ps per 32 bf16 of a weight row
// and x row. Batch 1 is bound by memory-level parallelism, so R is as large as the 32 zmm registers allow
// (M * R accumulators + R weight chunks + one x chunk). K % 32 == 16 ends with a masked load (zeros add nothing).
template <int M, int R>
KOSMOS2_AVX512 void gemv_columns_avx512(const uint16_t* W, const uint16_t* x, float* y, int64_t K, int64_t N,
                                        int64_t n0, int64_t n1) {
  const int64_t K32 = K - K % 32;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
      __m512i w[R];
      for (int r = 0; r < R; ++r) w[r] = _mm512_loadu_si512(W + (n + r) * K + k);
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)xv, (__m512bh)w[r]);
      }
    }
    if (K32 < K) {  // the last 16 values
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_maskz_loadu_epi16(0xFFFF, W + (n + r) * K + K32);
        for (int m = 0; m < M; ++m)
          acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)_mm512_maskz_loadu_epi16(0xFFFF, x + m * K + K32),
                                       (__m512bh)w);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
  }
  if (n < n1) gemv_columns_avx512<M, 1>(W, x, y, K, N, n, n1);  // the last R - 1 columns at most
}

using Columns512 = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t);
// rows in flight per batch size, measured on a 2-core Zen 4 with weights streamed from memory (docs/benchmarks.md)
const Columns512 kColumns512[] = {nullptr,
                                  gemv_columns_avx512<1, 8>, gemv_columns_avx512<2, 8>,
                                  gemv_columns_avx512<3, 6>, gemv_columns_avx512<4, 6>,
                                  gemv_columns_avx512<5, 3>, gemv_columns_avx512<6, 3>,
                                  gemv_columns_avx512<7, 3>, gemv_columns_avx512<8, 3>};


// x rows (bf16 or fp32) -> fp32, shuffled per chunk of 16 to the unpack's lane order (thread-local scratch)
const float* shuffled_rows(const torch::Tensor& x, int64_t M, int64_t K) {
  thread_local std::vector<float> scratch, widened;
  scratch.resize(M * K);
  const float* rows;
  if (x.scalar_type() == torch::kFloat32) {
    rows = x.data_ptr<float>();
  } else {
    widened.resize(M * K);
    const auto* src = x.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) widened[i] = static_cast<float>(src[i]);
    rows = widened.data();
  }
  for (int64_t m = 0; m < M; ++m) shuffle_like_unpack(rows + m * K, scratch.data() + m * K, K);
  return scratch.data();
}

}  // namespace

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  }();
  return has;
}

// y [M, N] fp32 = x @ weight.T (+ bias); the checks name what was wrong
torch::Tensor gemv_fp32(const torch::Tensor& x_in, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                        bool allow_avx512) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kBFloat16 && weight.dim() == 2 &&
              weight.is_contiguous(), "bf16_gemv: weight must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) == weight.size(1),
              "bf16_gemv: x must be a 2-D CPU tensor [M, K] with K = weight.size(1)");
  const int64_t M = x_in.size(0), K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "bf16_gemv: 1..8 rows of x, got ", M);
  TORCH_CHECK(K % 16 == 0, "bf16_gemv: K must be a multiple of 16, got ", K);
  // vdpbf16ps multiplies bf16 by bf16: only a bf16 x keeps its exact values (an fp32 x takes the AVX2 path)
  const bool avx512 = allow_avx512 && x_in.scalar_type() == torch::kBFloat16 && cpu_has_avx512_bf16();
  const torch::Tensor x = (x_in.scalar_type() == torch::kBFloat16 || x_in.scalar_type() == torch::kFloat32)
                              ? x_in.contiguous() : x_in.to(torch::kFloat32).contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  const auto* W = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  float* y_ptr = y.data_ptr<float>();
  // blocks of 64 columns: each thread streams contiguous stretches of the weight
  const int64_t blocks = (N + 63) / 64;
  if (avx512) {
    const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const Columns512 columns = kColumns512[M];
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      columns(W, xs, y_ptr, K, N, b0 * 64, std::min<int64_t>(N, b1 * 64));
    });
  } else {
    const float* xs = shuffled_rows(x, M, K);
    const Columns columns = kColumns[M];
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      columns(W, xs, y_ptr, K, N, b0 * 64, std::min<int64_t>(N, b1 * 64));
    });
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bf16_gemv: bias must have weight.size(0) = ", N, " values");
    y.add_(bias->to(torch::kFloat32));
  }
  return y;
}

torch::Tensor bf16_gemv(const torch::Tensor& x, const torch::Tensor& weight, bool allow_avx512) {
  return gemv_fp32(x, weight, c10::nullopt, allow_avx512);
}

// nn.Linear semantics for a decode step: fp32 accumulation, bias in fp32, one rounding to x's dtype
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          bool allow_avx512) {
  torch::Tensor y = gemv_fp32(x, weight, bias, allow_avx512);
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

// F.linear(x, W, bias) for bf16 x [M, K] (any M) and W packed by kosmos2.cpu.bf16_linear.pack_vnni to
// [Np/16, K/2, 16, 2] with Np = N rounded up to 32; fp32 accumulation, bias in fp32, one rounding to bf16.
torch::Tensor vnni_linear(const torch::Tensor& x_in, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                          int64_t N) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "vnni_linear: this CPU has no AVX512-BF16 (use bf16_linear)");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == torch::kBFloat16 && packed.dim() == 4 &&
              packed.size(2) == kosmos2::kVnniBlock && packed.size(3) == 2 && packed.size(0) % 2 == 0 && packed.is_contiguous(),
              "vnni_linear: packed must come from pack_vnni ([Np/16, K/2, 16, 2] bf16, Np a multiple of 32)");
  const int64_t K = 2 * packed.size(1), Np = packed.size(0) * kosmos2::kVnniBlock;
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == torch::kBFloat16 && x_in.dim() == 2 && x_in.size(1) == K,
              "vnni_linear: x must be a 2-D bf16 CPU tensor [M, K] with K = ", K);
  TORCH_CHECK(K % 16 == 0 && N <= Np && N > Np - kosmos2::kVnniPair, "vnni_linear: K must be a multiple of 16 and N match the packing");
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), pairs = Np / kosmos2::kVnniPair;
  torch::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "vnni_linear: bias must have N = ", N, " values");
    bias_f = bias->to(torch::kFloat32).contiguous();
  }
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  torch::Tensor out = torch::empty({M, N}, x.options());
  const auto* W = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* o = out.data_ptr<at::BFloat16>();
  kosmos2::parallel_chunks(pairs, [&](int64_t p) {
    for (int64_t r = 0; r < M; r += 8)  // prefill rows 8 at a time over a pair of column blocks that stays in L2
      kosmos2::vnni_pair_linear(W, p, xs + r * K, std::min<int64_t>(8, M - r), K, b, N, o + r * N);
  });
  return out;
}
