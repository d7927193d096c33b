// A small blocking thread pool for the codec. Not OpenMP: libgomp's workers spin after each
// parallel region, and beside torch's own OpenMP pool they starve the matmuls on a small CPU.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace forge_paging {

class Pool {
 public:
  explicit Pool(int threads);  // threads - 1 workers; the caller is the last one
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  // Runs fn(i) for i in [0, n), spread over the pool; returns when all are done. fn must not throw.
  void run(int64_t n, const std::function<void(int64_t)>& fn);
  int threads() const { return int(workers_.size()) + 1; }

 private:
  void work();
  void drain();
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, next_ = 0, done_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::mutex run_mu_;  // one run() at a time
};

}  // namespace forge_paging
