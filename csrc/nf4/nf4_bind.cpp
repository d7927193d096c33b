// Python bindings for the nf4 capability (kept thin: argument checks and pointer casts only).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "common.h"
#include "nf4/nf4_cpu.h"
#include "nf4/nf4_hd.h"
#ifdef FORGE_RT_HAS_CUDA
#include "nf4/nf4_cuda.h"
#endif

namespace py = pybind11;

namespace {

void check_args(int64_t n, int blocksize, int qtype) {
  if (n < 0) throw std::invalid_argument("nf4: element count must be >= 0");
  if (blocksize <= 0 || blocksize % 2 != 0) throw std::invalid_argument("nf4: blocksize must be even and > 0");
  if (qtype != forge_nf4::kNF4 && qtype != forge_nf4::kFP4) throw std::invalid_argument("nf4: qtype must be 0 (nf4) or 1 (fp4)");
}

}  // namespace

void register_nf4(py::module_& m) {
  m.def("nf4_quantize", [](uintptr_t src, int src_type, int64_t n, int blocksize, int qtype, uintptr_t packed,
                           uintptr_t absmax) {
          check_args(n, blocksize, qtype);
          if (src_type < forge_nf4::kF32 || src_type > forge_nf4::kBF16) throw std::invalid_argument("nf4: src_type must be 0 (f32), 1 (f16) or 2 (bf16)");
          py::gil_scoped_release nogil;
          return forge_nf4::quantize_cpu(ptr<const void>(src), src_type, n, blocksize, qtype, ptr<uint8_t>(packed),
                                  ptr<float>(absmax));
        },
        "blockwise 4-bit quantize of n CPU values (bitsandbytes layout) into packed bytes + fp32 absmax; "
        "returns the count of NaN/inf inputs");
  m.def("nf4_dequantize", [](uintptr_t packed, uintptr_t absmax, int64_t n, int blocksize, int qtype, uintptr_t out) {
          check_args(n, blocksize, qtype);
          py::gil_scoped_release nogil;
          forge_nf4::dequantize_cpu(ptr<const uint8_t>(packed), ptr<const float>(absmax), n, blocksize, qtype,
                                    ptr<float>(out));
        },
        "dequantize n CPU 4-bit values into fp32");
  m.def("nf4_code_value", &forge_nf4::code_value, "code book entry q (0..15) of qtype, from nf4_hd.h");
#ifdef FORGE_RT_HAS_CUDA
  m.def("nf4_dequantize_cuda", [](uintptr_t packed, uintptr_t absmax, int64_t n, int blocksize, int qtype,
                                  uintptr_t out, uintptr_t stream) {
          check_args(n, blocksize, qtype);
          int err = forge_nf4::dequantize_cuda(ptr<const uint8_t>(packed), ptr<const float>(absmax), n, blocksize,
                                               qtype, ptr<float>(out), reinterpret_cast<void*>(stream));
          if (err != 0) throw std::runtime_error("nf4_dequantize_cuda: CUDA error " + std::to_string(err));
        },
        "dequantize n device 4-bit values into fp32 on a CUDA stream");
#endif
}
