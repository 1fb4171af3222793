// The entry points of the kosmos2_cpu_kernels extension (bindings.cpp exposes them to Python; kosmos2/cpu/ calls them).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// bf16_gemv.cpp: bf16 linears for decoding (1..8 rows) and, on AVX512-BF16 CPUs, on weights packed by pack_vnni
bool cpu_has_avx512_bf16();
torch::Tensor bf16_gemv(const torch::Tensor& x, const torch::Tensor& weight, bool allow_avx512);
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          bool allow_avx512);
torch::Tensor vnni_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                          int64_t N);

// decode_attention.cpp: one decoding step of attention over the fp32 KV cache
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               torch::Tensor key_cache, torch::Tensor value_cache, int64_t start,
                               const c10::optional<torch::Tensor>& allowed);

// decode_layer.cpp: one decoding step of a whole decoder layer with VNNI-packed bf16 linears
torch::Tensor decode_layer(const torch::Tensor& x, const std::vector<torch::Tensor>& norms,
                           const std::vector<torch::Tensor>& linears,
                           const std::vector<c10::optional<torch::Tensor>>& biases, torch::Tensor key_cache,
                           torch::Tensor value_cache, int64_t start, const c10::optional<torch::Tensor>& allowed,
                           const torch::Tensor& gelu_table, double eps);

// train_attention.cpp: fp32 attention with gradients for training
std::vector<torch::Tensor> train_attention_forward(const torch::Tensor& q, const torch::Tensor& k,
                                                   const torch::Tensor& v, bool causal);
std::vector<torch::Tensor> train_attention_backward(const torch::Tensor& grad_out, const torch::Tensor& q,
                                                    const torch::Tensor& k, const torch::Tensor& v,
                                                    const torch::Tensor& out, const torch::Tensor& lse, bool causal);
