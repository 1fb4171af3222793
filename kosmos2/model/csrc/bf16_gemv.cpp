// y = x @ W^T for a bf16 weight W [N, K] and a few rows of x [M, K] (M <= 8: decoding steps), on AVX2 + FMA CPUs.
//
// Why: decoding streams every weight once per step, so its speed is memory bandwidth / bytes of weights. On CPUs
// without native bf16 instructions PyTorch's bf16 GEMV reaches ~12 GB/s here (it converts through generic code),
// while this loop streams the weight at ~20 GB/s: a bf16 value is the top half of an fp32, so widening is one
// unpack with zeros, and the x values are pre-shuffled to match the unpack's lane order.
// Accumulation is fp32, like PyTorch's bf16 matmul; the caller rounds the result.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

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

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

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

// y [M, N] fp32 = x @ weight.T (+ bias); the checks name what was wrong
torch::Tensor gemv_fp32(const torch::Tensor& x_in, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kBFloat16 && weight.dim() == 2 &&
              weight.is_contiguous(), "bf16_gemv: weight must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) == weight.size(1),
              "bf16_gemv: x must be a 2-D CPU tensor [M, K] with K = weight.size(1)");
  const int64_t M = x_in.size(0), K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "bf16_gemv: 1..8 rows of x, got ", M);
  TORCH_CHECK(K % 16 == 0, "bf16_gemv: K must be a multiple of 16, got ", K);
  const torch::Tensor x = (x_in.scalar_type() == torch::kBFloat16 || x_in.scalar_type() == torch::kFloat32)
                              ? x_in.contiguous() : x_in.to(torch::kFloat32).contiguous();
  const float* xs = shuffled_rows(x, M, K);
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  const auto* W = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const Columns columns = kColumns[M];
  float* y_ptr = y.data_ptr<float>();
  // blocks of 64 columns: each thread streams contiguous stretches of the weight
  const int64_t blocks = (N + 63) / 64;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    columns(W, xs, y_ptr, K, N, b0 * 64, std::min<int64_t>(N, b1 * 64));
  });
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bf16_gemv: bias must have weight.size(0) = ", N, " values");
    y.add_(bias->to(torch::kFloat32));
  }
  return y;
}

torch::Tensor bf16_gemv(const torch::Tensor& x, const torch::Tensor& weight) { return gemv_fp32(x, weight, c10::nullopt); }

// nn.Linear semantics for a decode step: fp32 accumulation, bias in fp32, one rounding to x's dtype
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  torch::Tensor y = gemv_fp32(x, weight, bias);
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "y = x @ weight.T for a bf16 weight and 1..8 rows of x (AVX2 + FMA), fp32 out");
  m.def("bf16_linear", &bf16_linear, "F.linear(x, weight, bias) for a bf16 weight and 1..8 rows, in x's dtype");
}
