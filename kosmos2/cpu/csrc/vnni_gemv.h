// Shared by the CPU kernels (bf16_gemv.cpp, decode_layer.cpp): the AVX512-BF16 GEMV on the blocked "VNNI" weight
// layout, and the CPU feature check that guards it.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "parallel_chunks.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

// compiled for any x86 CPU, called only where the CPU reports avx512bf16
#define KOSMOS2_AVX512 __attribute__((target("avx512f,avx512bw,avx512bf16")))

bool cpu_has_avx512_bf16();

namespace kosmos2 {

// ---- AVX512-BF16 on a blocked ("VNNI") weight layout, for any number of rows
// Layout [N/16][K/2][16][2]: 16 output columns x 2 consecutive k values per 64-byte chunk, so one column block is
// one contiguous stream and a vdpbf16ps with a broadcast x pair updates 16 outputs at once (no horizontal sums).
// Streams ~33 GB/s at 1..8 rows on our Zen 4 host where the row-major kernel (bf16_gemv.cpp) reaches ~31 GB/s at 1 row but
// ~21 GB/s at 8 (each row's dot product needs its own accumulator there). Prefill rows go 8 at a time over a pair
// of column blocks that stays in L2 (<= 2 x 16 x K x 2 bytes), so it doubles as a GEMM.
constexpr int64_t kVnniBlock = 16;               // output columns per block
constexpr int64_t kVnniPair = 2 * kVnniBlock;    // columns per unit of work (N is padded to this)

// Two column blocks for M rows of x; U independent accumulators per output hide vdpbf16ps latency at small M.
template <int M, int U>
KOSMOS2_AVX512 inline void vnni_pair(const uint16_t* Wp, const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t K2) {
  __m512 acc[M][2][U];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < 2; ++c)
      for (int u = 0; u < U; ++u) acc[m][c][u] = _mm512_setzero_ps();
  const uint16_t* w0 = Wp;
  const uint16_t* w1 = Wp + K2 * 2 * kVnniBlock;
  for (int64_t k2 = 0; k2 < K2; k2 += U) {
    for (int u = 0; u < U; ++u) {
      const __m512i a = _mm512_loadu_si512(w0 + (k2 + u) * 2 * kVnniBlock);
      const __m512i b = _mm512_loadu_si512(w1 + (k2 + u) * 2 * kVnniBlock);
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + m * ldx + 2 * (k2 + u)));
        acc[m][0][u] = _mm512_dpbf16_ps(acc[m][0][u], (__m512bh)xv, (__m512bh)a);
        acc[m][1][u] = _mm512_dpbf16_ps(acc[m][1][u], (__m512bh)xv, (__m512bh)b);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < 2; ++c) {
      __m512 sum = acc[m][c][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[m][c][u]);
      _mm512_storeu_ps(y + m * ldy + c * kVnniBlock, sum);
    }
}

using VnniPair = void (*)(const uint16_t*, const uint16_t*, int64_t, float*, int64_t, int64_t);
// K/2 is a multiple of 8 (K % 16 == 0), so every U below divides it
inline const VnniPair kVnniPairs[] = {nullptr, vnni_pair<1, 4>, vnni_pair<2, 2>, vnni_pair<3, 2>, vnni_pair<4, 2>,
                               vnni_pair<5, 1>, vnni_pair<6, 1>, vnni_pair<7, 1>, vnni_pair<8, 1>};

// Output columns [pair * 32, pair * 32 + 32) (clipped to N) of `rows` (<= 8) rows of x [rows, K] and a weight packed
// by pack_vnni: out[m * N + n] = bf16(x_m . W_n + bias[n]), summed in fp32, the bias added in fp32, rounded once, then
// mapped through `table` (65536 values indexed by the bf16 bit pattern, e.g. GELU) if one is given. The fp32 sums stay
// in L1: no [M, Np] fp32 tensor, no separate add and cast ops.
template <typename Bias>
inline void vnni_pair_linear(const uint16_t* packed, int64_t pair, const uint16_t* x, int64_t rows, int64_t K,
                             const Bias* bias, int64_t N, c10::BFloat16* out, const c10::BFloat16* table = nullptr) {
  float sums[8 * kVnniPair];
  const int64_t n0 = pair * kVnniPair, width = std::min<int64_t>(kVnniPair, N - n0);
  kVnniPairs[rows](packed + pair * kVnniPair * K, x, K, sums, kVnniPair, K / 2);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t c = 0; c < width; ++c) {
      const float b = bias != nullptr ? static_cast<float>(bias[n0 + c]) : 0.f;
      c10::BFloat16 v = static_cast<c10::BFloat16>(sums[m * kVnniPair + c] + b);
      if (table != nullptr) v = table[v.x];
      out[m * N + n0 + c] = v;
    }
  }
}

}  // namespace kosmos2
