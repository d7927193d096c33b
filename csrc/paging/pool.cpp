#include "paging/pool.h"

namespace forge_paging {

void Pool::run(int64_t n, const std::function<void(int64_t)>& fn) const {
  if (n == 1 || threads_ == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for num_threads(threads_) schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace forge_paging
