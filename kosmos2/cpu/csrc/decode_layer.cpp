// One decoding step of a whole Magneto decoder layer (kosmos2/model/decoder.py: DecoderLayer) in one call, for bf16
// models on AVX512-BF16 CPUs whose linears are VNNI-packed (kosmos2/cpu/bf16_linear.py: Bf16VnniLinear):
//
//   h = x + out_proj(inner_attn_ln(attention(self_attn_layer_norm(x))))
//   y = h + fc2(ffn_layernorm(gelu(fc1(final_layer_norm(h)))))
//
// Why: a batch-1 decode step streams ~2.6 GB of weights; between the seven weight streams of a layer, PyTorch runs
// ~15 small ops (layer norms, GELU, adds, reshapes), each through Python and ATen's dispatcher. The weight streams
// evict those code paths from the caches, so each small op starts cold: measured on a 2-core Zen 4, F.gelu on 8192
// values takes ~10 us in a loop but ~100 us right after fc1, and the small ops cost ~17 ms of a ~90 ms xl step.
// Here they are short loops with a small code footprint, and q/k/v stream in one parallel region.
//
// Arithmetic, in the order PyTorch's bf16 ops do it: every linear accumulates in fp32, adds its bias in fp32 and
// rounds once to bf16 (the same kernel as vnni_linear); residual adds are fp32 sums rounded once; GELU is PyTorch's
// own (a 65536-entry table of F.gelu over every bf16 value, built by the caller), so bit-identical. Layer norms
// compute mean and variance in double and normalise in fp32: they may differ from PyTorch's by one bf16 rounding on
// rare elements (its fp32 moments are summed in another order).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "decode_attention.h"
#include "kernels.h"
#include "vnni_gemv.h"

namespace {

using bf16 = at::BFloat16;

struct VnniLinear {
  const uint16_t* weight;  // pack_vnni layout [Np/16, K/2, 16, 2]
  const bf16* bias;        // [N] or nullptr
  int64_t N, K, pairs;
  bf16* out;               // [M, N]
};

VnniLinear packed_linear(const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias, int64_t N,
                           int64_t K, bf16* out, const char* name) {
  TORCH_CHECK(packed.scalar_type() == torch::kBFloat16 && packed.dim() == 4 && packed.is_contiguous() &&
              packed.size(2) == kosmos2::kVnniBlock && packed.size(3) == 2 && packed.size(0) % 2 == 0 &&
              2 * packed.size(1) == K && N <= packed.size(0) * kosmos2::kVnniBlock &&
              N > packed.size(0) * kosmos2::kVnniBlock - kosmos2::kVnniPair,
              "decode_layer: ", name, " must be pack_vnni's layout of a [", N, ", ", K, "] bf16 weight");
  const bf16* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kBFloat16 && bias->numel() == N && bias->is_contiguous(),
                "decode_layer: the bias of ", name, " must be a contiguous bf16 tensor of ", N, " values");
    b = bias->data_ptr<bf16>();
  }
  return {reinterpret_cast<const uint16_t*>(packed.data_ptr<bf16>()), b, N, K, packed.size(0) / 2, out};
}

// out_j = x @ W_j^T + b_j for linears sharing the input x [M, K] (M <= 8), in one parallel region: their weights
// stream back to back. `gelu` (or nullptr) maps each rounded output.
void run_linears(const bf16* x, int64_t M, const std::vector<VnniLinear>& linears, const bf16* gelu) {
  std::vector<int64_t> first(linears.size() + 1, 0);  // first pair index of each linear
  for (size_t j = 0; j < linears.size(); ++j) first[j + 1] = first[j] + linears[j].pairs;
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  kosmos2::parallel_chunks(first.back(), [&](int64_t p) {
    size_t j = 0;
    while (p >= first[j + 1]) ++j;
    const VnniLinear& lin = linears[j];
    kosmos2::vnni_pair_linear(lin.weight, p - first[j], xs, M, lin.K, lin.bias, lin.N, lin.out, gelu);
  });
}

// y = LayerNorm(x) over rows of width n: mean and variance in double, (x - mean) * rstd * w + b in fp32, one rounding
void layer_norm(const bf16* x, int64_t M, int64_t n, const bf16* w, const bf16* b, float eps, bf16* y) {
  for (int64_t m = 0; m < M; ++m) {
    const bf16* row = x + m * n;
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(row[i]);
    const double mean = sum / n;
    double squares = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<float>(row[i]) - mean;
      squares += d * d;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(squares / n + eps));
    const float shift = static_cast<float>(-mean) * rstd;
    for (int64_t i = 0; i < n; ++i) {
      const float normed = static_cast<float>(row[i]) * rstd + shift;
      y[m * n + i] = static_cast<bf16>(normed * static_cast<float>(w[i]) + static_cast<float>(b[i]));
    }
  }
}

// x += y, each sum in fp32 and rounded once (PyTorch's bf16 add)
void add_into(bf16* x, const bf16* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = static_cast<bf16>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
}

const bf16* vector_of(const torch::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 && t.numel() == n && t.is_contiguous(),
              "decode_layer: ", name, " must be a contiguous bf16 tensor of ", n, " values");
  return t.data_ptr<bf16>();
}

}  // namespace

// x: [B, d] bf16, this step's hidden state of each row (one new token per row). norms: the weights and biases of
// self_attn_layer_norm, inner_attn_ln, final_layer_norm, ffn_layernorm (8 tensors, in that order). linears: the
// pack_vnni weights of q_proj, k_proj, v_proj, out_proj, fc1, fc2; biases: theirs (or None). The caches and
// `allowed` are as in decode_attention. gelu_table: [65536] bf16, F.gelu of every bf16 bit pattern. Returns [B, d].
torch::Tensor decode_layer(const torch::Tensor& x_in, const std::vector<torch::Tensor>& norms,
                           const std::vector<torch::Tensor>& linears,
                           const std::vector<c10::optional<torch::Tensor>>& biases, torch::Tensor key_cache,
                           torch::Tensor value_cache, int64_t start, const c10::optional<torch::Tensor>& allowed,
                           const torch::Tensor& gelu_table, double eps) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "decode_layer: this CPU has no AVX512-BF16");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == torch::kBFloat16 && x_in.dim() == 2 &&
              x_in.size(0) >= 1 && x_in.size(0) <= 8, "decode_layer: x must be a [B, d] bf16 CPU tensor, B <= 8");
  TORCH_CHECK(norms.size() == 8 && linears.size() == 6 && biases.size() == 6,
              "decode_layer: expected 8 layer-norm tensors, 6 packed weights and 6 biases");
  kosmos2::check_caches(key_cache, value_cache, start, "decode_layer");
  TORCH_CHECK(gelu_table.scalar_type() == torch::kBFloat16 && gelu_table.numel() == 65536 &&
              gelu_table.is_contiguous(), "decode_layer: gelu_table must hold F.gelu of all 65536 bf16 values");
  const torch::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), H = key_cache.size(1), capacity = key_cache.size(2),
                D = key_cache.size(3);
  TORCH_CHECK(key_cache.size(0) == B && H * D == d, "decode_layer: caches [", B, ", H, capacity, D] with H * D = ", d);
  const int64_t f = 2 * linears[5].size(1);  // fc2's input width
  torch::Tensor allowed_c;
  const bool* allowed_ptr = kosmos2::checked_allowed(allowed, B, start, allowed_c, "decode_layer");
  const float epsf = static_cast<float>(eps);
  const char* norm_names[] = {"self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "inner_attn_ln.weight",
                              "inner_attn_ln.bias", "final_layer_norm.weight", "final_layer_norm.bias",
                              "ffn_layernorm.weight", "ffn_layernorm.bias"};
  const int64_t widths[] = {d, d, d, d, d, d, f, f};
  const bf16* n[8];
  for (int i = 0; i < 8; ++i) n[i] = vector_of(norms[i], widths[i], norm_names[i]);

  // scratch for one step: [B, d] x 5 + [B, f] x 2, bf16
  torch::Tensor y = x.clone();  // the residual stream, updated in place
  torch::Tensor scratch = torch::empty({B * (5 * d + 2 * f)}, x.options());
  bf16* s = scratch.data_ptr<bf16>();
  bf16 *normed = s, *q = normed + B * d, *k = q + B * d, *v = k + B * d, *attn = v + B * d, *wide = attn + B * d,
       *wide_normed = wide + B * f;
  bf16* out = y.data_ptr<bf16>();

  layer_norm(out, B, d, n[0], n[1], epsf, normed);
  run_linears(normed, B, {packed_linear(linears[0], biases[0], d, d, q, "q_proj"),
                          packed_linear(linears[1], biases[1], d, d, k, "k_proj"),
                          packed_linear(linears[2], biases[2], d, d, v, "v_proj")}, nullptr);
  kosmos2::decode_attention_rows<bf16>(q, k, v, d, key_cache.data_ptr<float>(), value_cache.data_ptr<float>(), B, H,
                                       capacity, D, start, allowed_ptr, attn, d);
  layer_norm(attn, B, d, n[2], n[3], epsf, normed);
  run_linears(normed, B, {packed_linear(linears[3], biases[3], d, d, attn, "out_proj")}, nullptr);
  add_into(out, attn, B * d);
  layer_norm(out, B, d, n[4], n[5], epsf, normed);
  run_linears(normed, B, {packed_linear(linears[4], biases[4], f, d, wide, "fc1")},
              reinterpret_cast<const bf16*>(gelu_table.data_ptr<bf16>()));
  layer_norm(wide, B, f, n[6], n[7], epsf, wide_normed);
  run_linears(wide_normed, B, {packed_linear(linears[5], biases[5], d, f, attn, "fc2")}, nullptr);
  add_into(out, attn, B * d);
  return y;
}
