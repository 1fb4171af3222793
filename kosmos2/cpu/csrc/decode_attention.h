// The fused decoding step of attention (decode_attention.cpp), for the other CPU kernels (decode_layer.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace kosmos2 {

// B rows x H heads of one decoding step: write row b's key/value (k/v + b * ld, H * D values) into the fp32 caches
// [B, H, capacity, D] at position `start` and attend with its query over positions 0..start (allowed: [B, start + 1]
// bool or nullptr); the result of row b goes to y + b * ldy. T is float or at::BFloat16.
template <typename T>
void decode_attention_rows(const T* q, const T* k, const T* v, int64_t ld, float* key_cache, float* value_cache,
                           int64_t B, int64_t H, int64_t capacity, int64_t D, int64_t start, const bool* allowed, T* y,
                           int64_t ldy);

// The checks both entry points make (`who` names the caller in the message): the caches are contiguous fp32 CPU
// tensors [B, H, capacity, D] of equal shape with room at `start`; `allowed` (optional) is bool [B, start + 1]. Returns
// the mask's data or nullptr; `keep` holds its contiguous copy.
void check_caches(const torch::Tensor& key_cache, const torch::Tensor& value_cache, int64_t start, const char* who);
const bool* checked_allowed(const c10::optional<torch::Tensor>& allowed, int64_t B, int64_t start, torch::Tensor& keep,
                            const char* who);

}  // namespace kosmos2
