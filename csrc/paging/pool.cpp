#include "paging/pool.h"

namespace forge_paging {

Pool::Pool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

Pool::~Pool() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

// Claims indices one at a time until none are left (chunks cost roughly the same, so no batching).
void Pool::drain() {
  std::unique_lock<std::mutex> g(mu_);
  while (next_ < n_) {
    const int64_t i = next_++;
    g.unlock();
    (*fn_)(i);
    g.lock();
    if (++done_ == n_) done_cv_.notify_all();
  }
}

void Pool::work() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> g(mu_);
  while (true) {
    start_cv_.wait(g, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    g.unlock();
    drain();
    g.lock();
  }
}

void Pool::run(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  std::lock_guard<std::mutex> one(run_mu_);
  if (n == 1 || workers_.empty()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    done_ = 0;
    ++generation_;
  }
  start_cv_.notify_all();
  drain();
  std::unique_lock<std::mutex> g(mu_);
  done_cv_.wait(g, [&] { return done_ == n_; });
  fn_ = nullptr;
  n_ = 0;
}

}  // namespace forge_paging
