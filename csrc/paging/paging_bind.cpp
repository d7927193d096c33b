// Python bindings for the paging capability (kept thin: argument checks and pointer casts only).
// Pointers arrive as integers (tensor.data_ptr()); the GIL is released around codec work so the
// pager's writer/reader threads and autograd keep running.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "paging/blob_hd.h"
#include "paging/crc32c.h"
#ifdef FORGE_RT_HAS_NVCOMP
#include "paging/bitshuffle.h"
#include "paging/codec.h"
#endif
#ifdef FORGE_RT_HAS_CUDA
#include "paging/paging_cuda.h"
#endif
namespace py = pybind11;
using namespace forge_paging;

namespace {
// The CUDA compaction's per-chunk logic run on the CPU: each "lane" copies a strided share of a
// payload, as one thread of the kernel's block would.
std::pair<std::vector<uint64_t>, uint64_t> compact_reference(uintptr_t slots, const std::vector<uint32_t>& stored,
                                                             uint64_t slot_bytes, uintptr_t blob, uint32_t lanes) {
  const uint32_t n = uint32_t(stored.size());
  std::vector<ChunkEntry> entries(n);
  for (uint32_t i = 0; i < n; ++i) entries[i] = ChunkEntry{stored[i], 0};
  std::vector<uint64_t> offsets(n);
  const uint64_t total = plan_offsets(entries.data(), n, offsets.data());
  if (blob)
    for (uint32_t i = 0; i < n; ++i) {
      const ChunkDesc d = describe_chunk(i, entries.data(), offsets.data(), slot_bytes);
      for (uint32_t lane = 0; lane < lanes; ++lane) copy_lane(ptr<uint8_t>(blob), ptr<const uint8_t>(slots), d, lane, lanes);
    }
  return {offsets, total};
}
}  // namespace

void register_paging(py::module_& m) {
  auto p = m.def_submodule("paging", "LZ4 activation paging codec");
  p.attr("RAW_FLAG") = kRawFlag;
  p.attr("TABLE_BYTES_PER_CHUNK") = sizeof(ChunkEntry);
  p.attr("HEADER_BYTES") = sizeof(BlobHeader);
  p.def("stored_field", &stored_field, py::arg("comp_len"), py::arg("raw_len"));
  p.def("crc32c_hd", [](uintptr_t src, uint64_t n) { return crc32c_update(0, ptr<const uint8_t>(src), n); },
        py::arg("src"), py::arg("n"), "the GPU kernels' bitwise CRC-32C, run on the CPU");
  p.def("crc32c", [](uintptr_t src, uint64_t n, uint32_t crc) { return crc32c(ptr<const uint8_t>(src), n, crc); },
        py::arg("src"), py::arg("n"), py::arg("crc") = 0,
        "the CPU codec's CRC-32C (SSE4.2 / ARMv8 CRC instructions where present), continuing from `crc`",
        py::call_guard<py::gil_scoped_release>());
  p.def("crc32c_table", [](uintptr_t src, uint64_t n) { return crc32c_table(ptr<const uint8_t>(src), n); },
        py::arg("src"), py::arg("n"), "the byte-table CRC-32C used where the build has no CRC instructions");
  p.def("compact_reference", &compact_reference, py::arg("slots"), py::arg("stored"), py::arg("slot_bytes"),
        py::arg("blob"), py::arg("lanes"),
        "plan offsets and copy chunk payloads with the CUDA kernel's __host__ __device__ code; -> (offsets, total)");
#ifdef FORGE_RT_HAS_NVCOMP
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
      .def_property_readonly("lz4_planes", &Codec::lz4_planes)
      .def("last_slots", [](const Codec& c) {
        return py::bytes(reinterpret_cast<const char*>(c.slots().data()), c.slots().size());
      })
      .def("last_stored", [](const Codec& c) {
        std::vector<uint32_t> s;
        for (const auto& e : c.entries()) s.push_back(e.stored);
        return s;
      });
  p.def("bitshuffle",
        [](uintptr_t src, uintptr_t dst, size_t n, size_t width, bool simd) {
          std::vector<uint8_t> tmp(n * width);
          bitshuffle(ptr<const uint8_t>(src), ptr<uint8_t>(dst), tmp.data(), n, width, simd);
        },
        py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("width"), py::arg("simd") = true);
  p.def("bitunshuffle",
        [](uintptr_t src, uintptr_t dst, size_t n, size_t width, bool simd) {
          std::vector<uint8_t> tmp(n * width);
          bitunshuffle(ptr<const uint8_t>(src), ptr<uint8_t>(dst), tmp.data(), n, width, simd);
        },
        py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("width"), py::arg("simd") = true);
  p.def("fp32_low16_zero", [](uintptr_t src, uint64_t n) { return fp32_low16_zero(ptr<const uint8_t>(src), n); },
        py::arg("src"), py::arg("n"), py::call_guard<py::gil_scoped_release>());
#else
  p.attr("available") = false;
#endif
#ifdef FORGE_RT_HAS_CUDA
  // Device pointers and a cudaStream_t as integers; results arrive in device memory (no host sync).
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
#else
  p.attr("cuda") = false;
#endif
}
