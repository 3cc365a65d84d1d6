// Parallel loops for the service's kernels (cpu_kernels.cpp, packed_linear.cpp), on the team of the calling thread.
#pragma once

#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <linux/futex.h>
#include <omp.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace adapter_service {

// at::parallel_for's inline lazy set-up keeps a thread_local "done" flag in each shared library that inlines it,
// so its first call from this extension on a thread resets that thread's count to torch's global default. The
// model thread runs with more threads than that default (service/model/threads.py), so this extension splits its
// loops itself, with the count libtorch already holds for the calling thread.

// The kernels' own thread team: the calling thread and `threads - 1` workers kept for the process, with no
// barrier. OpenMP ends every region at a barrier, so the model thread waits there for each worker, even one that
// had nothing to do and was merely descheduled (by the HTTP side or the client: a served decode step took 1.5x
// the same step in one process). Here a region's parts are claimed one at a time through one atomic word (the
// region's number, the parts claimed, the parts in all), by whichever thread is free: a worker the OS has taken
// off its core claims nothing, the caller runs its parts too, and returns as soon as every claimed part is done.
// Workers spin a little between regions (a step runs hundreds back to back), then sleep on a futex.
namespace team {

inline void relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// How long an idle worker spins on its core for the next region, then how long it keeps polling while yielding
// its core to any other thread that wants it, before it sleeps.
constexpr std::chrono::microseconds kSpin{50};
constexpr std::chrono::microseconds kYield{2000};

inline thread_local bool in_team = false;  // this thread is running a part: loops inside it run inline

struct Region {
  void (*call)(const void*, int, int) = nullptr;
  const void* context = nullptr;
};

class Team {
 public:
  static Team& instance() {
    static Team* team = new Team();  // never destroyed: its workers outlive static destruction
    return *team;
  }

  // Runs call(context, part, parts) for every part in [0, parts), on this thread and the workers; false if another
  // thread is running a region now (the caller then runs the parts itself).
  bool run(int parts, const void* context, void (*call)(const void*, int, int), std::exception_ptr& error) {
    std::unique_lock<std::mutex> owner(running_, std::try_to_lock);
    if (!owner.owns_lock()) return false;
    grow(parts - 1);
    region_.call = call;
    region_.context = context;
    error_ = nullptr;
    done_.store(0, std::memory_order_relaxed);
    number_ = (number_ + 1) & 0xffffffffu;
    word_.store(number_ << 32 | static_cast<uint64_t>(parts), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      wake_.fetch_add(1, std::memory_order_seq_cst);
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
    }
    while (claim_and_run()) {
    }
    for (int spins = 0; done_.load(std::memory_order_acquire) < parts; ++spins) {
      if (spins < 4096) {
        relax();
      } else {
        sched_yield();  // a worker holding a part was taken off its core: let it back on
      }
    }
    error = error_;
    return true;
  }

 private:
  Team() = default;

  // Claims the region's next part, if any is left, and runs it; false when none was.
  bool claim_and_run() {
    uint64_t word = word_.load(std::memory_order_acquire);
    while (true) {
      const uint64_t parts = word & 0xffff, claimed = word >> 16 & 0xffff;
      if (claimed >= parts) return false;
      if (word_.compare_exchange_weak(word, word + (uint64_t{1} << 16), std::memory_order_acq_rel)) {
        // The region cannot end (nor its description change) before this part is counted done.
        const Region region = region_;
        const bool outer = in_team;
        in_team = true;
        try {
          region.call(region.context, static_cast<int>(claimed), static_cast<int>(parts));
        } catch (...) {
          std::lock_guard<std::mutex> guard(error_lock_);
          if (!error_) error_ = std::current_exception();
        }
        in_team = outer;
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
  }

  void grow(int workers) {
    while (static_cast<int>(workers_) < workers) {
      std::thread([this] { work(); }).detach();
      ++workers_;
    }
  }

  void work() {
    while (true) {
      if (!poll()) sleep_until_woken();
    }
  }

  // Runs a part if one comes up within kSpin + kYield (true), else returns false.
  bool poll() {
    using clock = std::chrono::steady_clock;
    const auto spin_until = clock::now() + kSpin, yield_until = spin_until + kYield;
    for (int polls = 1;; ++polls) {
      if (claim_and_run()) return true;
      if (polls % 64 == 0) {
        const auto now = clock::now();
        if (now >= yield_until) return false;
        if (now >= spin_until) {
          sched_yield();
          continue;
        }
      }
      relax();
    }
  }

  // Sleeps until a region is published, unless one already has parts left.
  void sleep_until_woken() {
    const uint32_t ticket = wake_.load(std::memory_order_seq_cst);
    sleeping_.fetch_add(1, std::memory_order_seq_cst);
    const uint64_t word = word_.load(std::memory_order_seq_cst);
    if ((word >> 16 & 0xffff) >= (word & 0xffff)) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAIT_PRIVATE, ticket, nullptr, nullptr, 0);
    }
    sleeping_.fetch_sub(1, std::memory_order_seq_cst);
  }

  std::mutex running_;  // one region at a time
  std::atomic<uint64_t> word_{0};  // region number << 32 | parts claimed << 16 | parts
  std::atomic<int> done_{0};
  std::atomic<uint32_t> wake_{0};  // futex word: bumped to wake sleeping workers
  std::atomic<int> sleeping_{0};
  uint64_t number_ = 0;
  Region region_;
  std::mutex error_lock_;
  std::exception_ptr error_;
  int workers_ = 0;
};

}  // namespace team

// The kernels' loops inside `kernel_threads` (an owned step: nothing else on the thread opens an OpenMP team) run
// on the team above; elsewhere (the transformers forward, whose torch ops keep OpenMP's team busy between the
// kernels' loops) on OpenMP's, which a second team would fight for the cores (a classification pass on the
// prepacked modules fell from 27-37 to 21-26 requests a second with the kernels on their own team).
inline thread_local int kernel_threads = 0;

// Runs part(thread, team) once for each thread number of a team of `threads` (on the kernels' team, whichever of
// its threads are free, one thread possibly running several); the first exception thrown is rethrown after every
// part has run.
template <typename F>
void run_team(int threads, const F& part) {
  std::exception_ptr error;
  if (kernel_threads > 0) {
    const auto call = [](const void* context, int thread, int team) {
      (*static_cast<const F*>(context))(thread, team);
    };
    if (!team::Team::instance().run(threads, &part, call, error)) {  // another thread's region: run them here
      for (int thread = 0; thread < threads; ++thread) {
        try {
          part(thread, threads);
        } catch (...) {
          if (!error) error = std::current_exception();
        }
      }
    }
  } else {
#pragma omp parallel num_threads(threads)
    {
      try {
        part(omp_get_thread_num(), omp_get_num_threads());
      } catch (...) {
#pragma omp critical(adapter_service_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// The threads of a team started on this thread: torch's count for it, unless `kernel_threads` handed that count
// to the kernels alone (torch's own ops then run on one).
inline int team_size() { return std::min(kernel_threads > 0 ? kernel_threads : at::get_num_threads(), 0xffff); }

inline int team_for(int64_t items, int64_t grain) {
  const int threads = team_size();
  return items < grain || threads == 1 || team::in_team || omp_in_parallel() ? 1 : threads;
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
