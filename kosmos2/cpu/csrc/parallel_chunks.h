// Dynamic scheduling for the CPU kernels: threads take chunks of work from a shared counter.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace kosmos2 {

// fn(p) for every p in [0, total), on all threads, which take chunks of consecutive p from a shared counter instead of
// a fixed half each: on a shared VM one core is often slowed for a while, and with a static split the other then
// waits at the end of every region (a decode step has ~100). Eight chunks per thread measured best on a 2-core Zen 4:
// xl bf16 decode steps 4-8 % faster than with at::parallel_for's static split, in per-step A/B runs.
template <typename Fn>
void parallel_chunks(int64_t total, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, total / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {  // inside another parallel region: runs inline, takes all
    for (int64_t first = next.fetch_add(chunk); first < total; first = next.fetch_add(chunk))
      for (int64_t p = first; p < std::min(total, first + chunk); ++p) fn(p);
  });
}

}  // namespace kosmos2
