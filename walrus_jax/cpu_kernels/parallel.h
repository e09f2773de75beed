// Work sharing over XLA:CPU's intra-op thread pool, shared by the project's FFI kernels.
#ifndef WALRUS_JAX_CPU_KERNELS_PARALLEL_H_
#define WALRUS_JAX_CPU_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace walrus_jax {

// Runs fn(item) for item in [0, n_items) on the calling thread and the pool's threads. Items are
// claimed one at a time from a shared counter; the call returns once every item has finished.
// Pool tasks that start late find nothing left and return at once (they only touch the counters,
// which they co-own).
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t n_items, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t total = 0;
    const std::function<void(int64_t)>* fn = nullptr;
  };
  auto state = std::make_shared<State>();
  state->total = n_items;
  state->fn = &fn;
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.total;) {
      (*s.fn)(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n_items) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state, work]() { work(*state); });
  work(*state);
  while (state->done.load(std::memory_order_acquire) < n_items) std::this_thread::yield();
}

// Work items of a kernel whose backward writes one partial sum per item (summed by the caller): a
// function of the item count alone, so that the partials' shape is known when tracing
// (`cpu_kernels.partial_items` in Python mirrors it).
inline int64_t partial_items(int64_t n) { return std::min<int64_t>(n, 64); }

// fn(item, begin, end) for n units cut into `items` nearly equal runs: run i is
// [n i / items, n (i + 1) / items).
inline void parallel_runs(xla::ffi::ThreadPool& pool, int64_t n, int64_t items,
                          const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  parallel_for(pool, items, [&](int64_t i) { fn(i, n * i / items, n * (i + 1) / items); });
}

}  // namespace walrus_jax

#endif  // WALRUS_JAX_CPU_KERNELS_PARALLEL_H_
