// Python bindings for the GGML quantizers (argument checks and pointer casts only).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "kquant/kquant_cpu.h"

namespace py = pybind11;

void register_kquant(py::module_& m) {
  m.def("ggml_block_size", [](int type) { return py::make_tuple(forge_kq::block_values(type), forge_kq::block_bytes(type)); },
        "(values per block, bytes per block) of a GGML type id this build writes; (0, 0) otherwise");
  m.def("ggml_quantize", [](int type, uintptr_t src, int64_t nrows, int64_t n_per_row, uintptr_t imatrix, uintptr_t dst) {
          const int64_t bv = forge_kq::block_values(type);
          if (bv == 0) throw std::invalid_argument("ggml_quantize: GGML type " + std::to_string(type) + " is not written by this build");
          if (nrows < 0 || n_per_row <= 0 || n_per_row % bv != 0)
            throw std::invalid_argument("ggml_quantize: row length " + std::to_string(n_per_row) + " is not a positive multiple of " + std::to_string(bv));
          py::gil_scoped_release nogil;
          forge_kq::quantize_rows(type, ptr<const float>(src), nrows, n_per_row, imatrix ? ptr<const float>(imatrix) : nullptr,
                                  ptr<uint8_t>(dst));
          return nrows * (n_per_row / bv) * forge_kq::block_bytes(type);
        },
        "quantize nrows x n_per_row contiguous fp32 CPU values (imatrix: n_per_row fp32 importance weights, "
        "or 0) into ggml's block bytes; returns the byte count");
}
