// The CPU kernels' helper threads (one pool per process, shared by int8_dot.cc and attention.cc) and the loop that
// splits a kernel's independent work units between them and the calling thread.
#pragma once

#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace ssm_llm_cpu {

// Helper threads of our own, one per further usable core ($SSM_LLM_INT8_DOT_THREADS caps the total): each product's
// column blocks (each attention's query rows) are claimed from a counter by the caller and the helpers. XLA's
// intra-op pool wakes a sleeping thread in tens of microseconds, about as long as one decode product, so its helpers came too late; ours spin
// briefly after each product (a decode step runs hundreds back to back), then sleep. The caller never waits
// for a helper that has not started: it waits only for the blocks already claimed.
class Workers {
 public:
  explicit Workers(int helpers) : owner_(getpid()) {
    for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { loop(); });
  }
  int helpers() const { return static_cast<int>(threads_.size()); }

  // Offers f to the helpers and runs it on the caller; f claims parts of the work until none is left, and
  // `finished()` says when every claimed part is done. Then no helper may enter f, and those inside are waited
  // for (they find nothing left). One caller at a time: another caller (XLA runs independent ops concurrently)
  // and a forked child (which has no helpers) get false and run f alone.
  template <typename F, typename Done>
  bool run(F& f, Done finished) {
    if (threads_.empty() || getpid() != owner_ || busy_.exchange(true)) return false;
    job_ = &f;
    invoke_ = [](void* p) { (*static_cast<F*>(p))(); };
    open_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    f();
    while (!finished()) _mm_pause();
    open_.store(false);  // before reading active_; a helper raises active_ before reading open_ (seq_cst)
    while (active_.load() > 0) _mm_pause();
    busy_.store(false);
    return true;
  }

 private:
  void loop() {
    uint64_t seen = 0;  // the generation at construction: a run may start before this thread does
    for (;;) {
      for (int spin = 0; spin < kSpins && generation_.load() == seen; ++spin) _mm_pause();
      generation_.wait(seen);
      seen = generation_.load();
      active_.fetch_add(1);
      if (open_.load()) invoke_(job_);
      active_.fetch_sub(1);
    }
  }
  static constexpr int kSpins = 1024;  // pause instructions before sleeping: ~25 us on a 2.6 GHz EPYC
  const pid_t owner_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0};
  std::atomic<bool> busy_{false}, open_{false};
  void* job_ = nullptr;
  void (*invoke_)(void*) = nullptr;
};

inline int threads_to_use() {
  if (const char* cap = std::getenv("SSM_LLM_INT8_DOT_THREADS")) {
    const int n = std::atoi(cap);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Never destroyed: the helpers end with the process. (A destructor joining them would run at exit in a forked
// child too, whose std::thread objects name threads that only the parent has.)
inline Workers& workers() {
  static Workers* pool = new Workers(threads_to_use() - 1);
  return *pool;
}

// Units [0, nblocks) (a kernel's column blocks, rows, ...) in about two parts per thread, claimed by the caller and
// the helpers: cols(b0, b1) computes units [b0, b1).
template <typename Cols>
inline void in_parts(int64_t nblocks, Cols cols) {
  Workers& pool = workers();
  const int64_t threads = 1 + pool.helpers();
  const int64_t per = std::max<int64_t>(1, (nblocks + 2 * threads - 1) / (2 * threads));
  const int64_t parts = (nblocks + per - 1) / per;
  std::atomic<int64_t> next{0}, done{0};
  auto work = [&]() {
    for (int64_t c; (c = next.fetch_add(1)) < parts; done.fetch_add(1))
      cols(c * per, std::min(nblocks, (c + 1) * per));
  };
  if (parts < 2 || !pool.run(work, [&] { return done.load() == parts; })) work();
}

}  // namespace ssm_llm_cpu
