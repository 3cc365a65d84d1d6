// Parallel loops for the service's kernels (cpu_kernels.cpp, amx_linear.cpp), on the team of the calling thread.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <vector>

namespace adapter_service {

// at::parallel_for's inline lazy set-up keeps a thread_local "done" flag in each shared library that inlines it,
// so its first call from this extension on a thread resets that thread's count to torch's global default. The
// model thread runs with more threads than that default (service/model/threads.py), so this extension splits its
// loops itself, with the count libtorch already holds for the calling thread.

// Runs part(thread, team) on each thread of a team; an exception may not leave an OpenMP region, so the first one
// thrown is rethrown after it.
template <typename F>
void run_team(int threads, const F& part) {
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    try {
      part(omp_get_thread_num(), omp_get_num_threads());
    } catch (...) {
#pragma omp critical(adapter_service_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

inline int team_for(int64_t items, int64_t grain) {
  const int threads = at::get_num_threads();
  return items < grain || threads == 1 || omp_in_parallel() ? 1 : threads;
}

// Contiguous equal shares, as at::parallel_for splits: for loops whose items cost the same.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  if (begin >= end) return;
  const int threads = team_for(end - begin, grain);
  if (threads == 1) return body(begin, end);
  run_team(threads, [&](int thread, int team) {
    const int64_t used = std::min<int64_t>(team, (end - begin + grain - 1) / grain);
    const int64_t share = (end - begin + used - 1) / used;
    const int64_t first = begin + thread * share;
    if (first < end) body(first, std::min(end, first + share));
  });
}

// Blocks of `block` items claimed in turn: for loops whose items cost unevenly (attention over rows of different
// lengths: prompt tokens beside long decode rows left one thread with all the long rows under equal shares). A
// thread that the OS preempts holds back at most its current block; the others take the rest.
template <typename F>
void parallel_for_claimed(int64_t begin, int64_t end, int64_t block, const F& body) {
  if (begin >= end) return;
  const int threads = team_for(end - begin, 2 * block);
  if (threads == 1) return body(begin, end);
  std::atomic<int64_t> next{begin};
  run_team(threads, [&](int, int) {
    for (int64_t first = next.fetch_add(block); first < end; first = next.fetch_add(block)) {
      body(first, std::min(end, first + block));
    }
  });
}

// Blocks [0, blocks) split in equal contiguous ranges, one per thread, each walked from its front; a thread done
// with its own range takes blocks from the back of the others'. Each thread so streams through memory in order (the
// weights of a matmul: hardware and software prefetch run ahead), yet a thread the OS preempts holds back only its
// current block. body(block) runs once per block; enter() and leave() run on each thread of the team around its
// blocks (per-thread state such as a tile configuration).
template <typename F, typename Enter, typename Leave>
void parallel_for_stealing(int64_t blocks, const F& body, const Enter& enter, const Leave& leave) {
  if (blocks <= 0) return;
  const int threads = team_for(blocks, 2);
  if (threads == 1) {
    enter();
    for (int64_t block = 0; block < blocks; ++block) body(block);
    leave();
    return;
  }
  // Each range's [front, back) packed in one word, so taking from either end is one compare-and-swap.
  std::vector<std::atomic<uint64_t>> ranges(threads);
  const int64_t share = (blocks + threads - 1) / threads;
  for (int r = 0; r < threads; ++r) {
    const uint64_t front = std::min(blocks, r * share), back = std::min(blocks, (r + 1) * share);
    ranges[r].store(front << 32 | back, std::memory_order_relaxed);
  }
  run_team(threads, [&](int thread, int) {
    enter();
    for (int step = 0; step < threads; ++step) {  // every range, even if OpenMP gave the team fewer threads
      const bool own = step == 0;
      auto& range = ranges[(thread + step) % threads];
      uint64_t seen = range.load(std::memory_order_relaxed);
      while (true) {
        const uint64_t front = seen >> 32, back = seen & 0xffffffffu;
        if (front >= back) break;
        const uint64_t rest = own ? ((front + 1) << 32 | back) : (front << 32 | (back - 1));
        if (range.compare_exchange_weak(seen, rest)) {
          body(static_cast<int64_t>(own ? front : back - 1));
          seen = range.load(std::memory_order_relaxed);
        }
      }
    }
    leave();
  });
}

}  // namespace adapter_service
