// Python bindings for the paging capability (kept thin: argument checks and pointer casts only).
// Pointers arrive as integers (tensor.data_ptr()); the GIL is released around codec work so the
// pager's writer/reader threads and autograd keep running.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "paging/blob_hd.h"
#include "paging/crc32c.h"
#ifdef FORGE_RT_HAS_NVCOMP
#include "paging/codec.h"
#endif
#ifdef FORGE_RT_HAS_CUDA
#include "paging/paging_cuda.h"
#endif
namespace py = pybind11;
using namespace forge_paging;

namespace {

#ifdef FORGE_RT_HAS_NVCOMP
void register_codec(py::module_& p) {
  p.attr("available") = true;
  py::register_exception<CodecError>(p, "CodecError", PyExc_RuntimeError);
  py::class_<Codec>(p, "Codec")
      .def(py::init<int, int, uint32_t>(), py::arg("threads"), py::arg("level"), py::arg("chunk_bytes"))
      .def("compress",
           [](Codec& c, uintptr_t src, uint64_t nbytes, uint32_t width, bool half, double min_ratio,
              uint32_t lz4_planes) {
             return c.compress(ptr<const uint8_t>(src), nbytes, width, half, min_ratio, lz4_planes);
           },
           py::arg("src"), py::arg("nbytes"), py::arg("width"), py::arg("half"), py::arg("min_ratio"),
           py::arg("lz4_planes") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("probe",
           [](Codec& c, uintptr_t src, uint64_t nbytes, uint32_t width, bool half, double min_ratio) {
             return c.probe(ptr<const uint8_t>(src), nbytes, width, half, min_ratio);
           },
           py::arg("src"), py::arg("nbytes"), py::arg("width"), py::arg("half"), py::arg("min_ratio"),
           py::call_guard<py::gil_scoped_release>())
      .def("take", [](Codec& c, uintptr_t dst) { c.take(ptr<uint8_t>(dst)); },
           py::call_guard<py::gil_scoped_release>())
      .def("decompress",
           [](const Codec& c, uintptr_t blob, uint64_t blob_bytes, uintptr_t dst, uint64_t nbytes, uint32_t width,
              bool half) { c.decompress(ptr<const uint8_t>(blob), blob_bytes, ptr<uint8_t>(dst), nbytes, width, half); },
           py::arg("blob"), py::arg("blob_bytes"), py::arg("dst"), py::arg("nbytes"), py::arg("width"), py::arg("half"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("slot_bytes", &Codec::slot_bytes)
      .def_property_readonly("lz4_planes", &Codec::lz4_planes);
  p.def("fp32_low16_zero", [](uintptr_t src, uint64_t n) { return fp32_low16_zero(ptr<const uint8_t>(src), n); },
        py::arg("src"), py::arg("n"), py::call_guard<py::gil_scoped_release>());
}
#endif

#ifdef FORGE_RT_HAS_CUDA
// Device pointers and a cudaStream_t as integers; results arrive in device memory (no host sync).
void register_cuda(py::module_& p) {
  p.attr("cuda") = true;
  p.def("cuda_compress_scratch_bytes", &cuda_compress_scratch_bytes, py::arg("nbytes"), py::arg("width"),
        py::arg("chunk_bytes"));
  p.def("cuda_blob_bound", &cuda_blob_bound, py::arg("nbytes"), py::arg("chunk_bytes"));
  p.def("cuda_compress",
        [](uintptr_t src, uint64_t nbytes, uint32_t width, uint32_t chunk_bytes, uintptr_t scratch, size_t scratch_bytes,
           uintptr_t blob, uintptr_t blob_bytes, uintptr_t stream) {
          return cuda_compress(ptr<const void>(src), nbytes, width, chunk_bytes, ptr<void>(scratch), scratch_bytes,
                               ptr<void>(blob), ptr<uint64_t>(blob_bytes), ptr<void>(stream));
        });
  p.def("cuda_decompress",
        [](uintptr_t blob, uint64_t blob_bytes, uint32_t n_chunks, uintptr_t dst, uint64_t nbytes, uint32_t width,
           uint32_t chunk_bytes, uintptr_t scratch, size_t scratch_bytes, uintptr_t bad, uintptr_t stream) {
          return cuda_decompress(ptr<const void>(blob), blob_bytes, n_chunks, ptr<void>(dst), nbytes, width, chunk_bytes,
                                 ptr<void>(scratch), scratch_bytes, ptr<int>(bad), ptr<void>(stream));
        });
}
#endif

}  // namespace

void register_paging(py::module_& m) {
  auto p = m.def_submodule("paging", "LZ4 activation paging codec");
  p.attr("RAW_FLAG") = kRawFlag;
  p.attr("TABLE_BYTES_PER_CHUNK") = sizeof(ChunkEntry);
  p.attr("HEADER_BYTES") = sizeof(BlobHeader);
  p.def("crc32c", [](uintptr_t src, uint64_t n, uint32_t crc) { return crc32c(ptr<const uint8_t>(src), n, crc); },
        py::arg("src"), py::arg("n"), py::arg("crc") = 0,
        "the CPU codec's CRC-32C (SSE4.2 / ARMv8 CRC instructions where the CPU has them), continuing from `crc`",
        py::call_guard<py::gil_scoped_release>());
  p.attr("available") = false;  // set by what the build has, below
  p.attr("cuda") = false;
#ifdef FORGE_RT_HAS_NVCOMP
  register_codec(p);
#endif
#ifdef FORGE_RT_HAS_CUDA
  register_cuda(p);
#endif
}
