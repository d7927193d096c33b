// Python bindings for the qlora capability (kept thin: pointer casts only). forge_rt/kernels/qlora_cpu.py
// checks shapes, dtypes (fp32), contiguity and devices before calling; a null pointer (0) means "absent".
#include <pybind11/pybind11.h>

#include "common.h"
#include "qlora/qlora_cpu.h"

namespace py = pybind11;
using forge_qlora::NF4View;

namespace {

NF4View view(uintptr_t packed, uintptr_t absmax, uintptr_t code, int64_t rows, int64_t cols,
             int64_t blocksize) {
  return NF4View{ptr<const uint8_t>(packed), ptr<const float>(absmax), ptr<const float>(code), rows,
                 cols, blocksize};
}

}  // namespace

void register_qlora(py::module_& m) {
  m.def(
      "qlora_forward",
      [](uintptr_t x, int64_t M, uintptr_t packed, uintptr_t absmax, uintptr_t code, int64_t N,
         int64_t K, int64_t blocksize, uintptr_t xa, uintptr_t B, int64_t r, float scaling,
         uintptr_t bias, uintptr_t y, int n_threads) {
        const NF4View w = view(packed, absmax, code, N, K, blocksize);
        py::gil_scoped_release release;
        forge_qlora::forward(ptr<const float>(x), M, w, ptr<const float>(xa), ptr<const float>(B), r,
                             scaling, ptr<const float>(bias), ptr<float>(y), n_threads);
      },
      "y[M,N] = x[M,K] @ dequant(W)^T + bias + scaling * xa[M,r] @ B[N,r]^T (fp32, raw pointers)");
  m.def(
      "qlora_backward_input",
      [](uintptr_t g, int64_t M, uintptr_t packed, uintptr_t absmax, uintptr_t code, int64_t N,
         int64_t K, int64_t blocksize, uintptr_t gb, uintptr_t A, int64_t r, float scaling,
         uintptr_t gx, int n_threads) {
        const NF4View w = view(packed, absmax, code, N, K, blocksize);
        py::gil_scoped_release release;
        forge_qlora::backward_input(ptr<const float>(g), M, w, ptr<const float>(gb),
                                    ptr<const float>(A), r, scaling, ptr<float>(gx), n_threads);
      },
      "gx[M,K] = g[M,N] @ dequant(W) + scaling * gb[M,r] @ A[r,K] (fp32, raw pointers)");
  m.def(
      "qlora_dropout",
      [](uintptr_t x, int64_t n, uint32_t k0, uint32_t k1, uint32_t threshold, float scale, uintptr_t out,
         int n_threads) {
        py::gil_scoped_release release;
        forge_qlora::dropout(ptr<const float>(x), n, k0, k1, threshold, scale, ptr<float>(out), n_threads);
      },
      "out[n] = x * scale where the counter hash of (i, k0, k1) >= threshold, else 0 (fp32, raw pointers)");
  m.def("qlora_last_transient_bytes", &forge_qlora::last_transient_bytes,
        "scratch bytes (all threads) the last qlora call allocated");
}
