// Runs the codec's per-group work on OpenMP threads. It must be the OpenMP runtime torch uses
// (libgomp.so.1, one copy per process): called from the thread that runs torch's ops, the codec
// then reuses torch's own team, whose threads are awake, instead of a second pool whose threads
// fight torch's spinning ones for the same cores (measured: codec time 3.1 s -> 2.0 s per step).
#pragma once
#include <cstdint>
#include <functional>

namespace forge_paging {

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads < 1 ? 1 : threads) {}
  // Runs fn(i) for i in [0, n) over up to threads() threads; returns when all are done. fn must not throw.
  void run(int64_t n, const std::function<void(int64_t)>& fn) const;
  int threads() const { return threads_; }

 private:
  int threads_;
};

}  // namespace forge_paging
