// forge_rt._C.testing: hooks only tests and benches call (CPU runs of the CUDA kernels' code, the
// fallbacks of runtime-dispatched paths, the codec's scratch). Compiled into every build so CI can
// test the installed wheel; nothing in forge_rt/ imports it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_path.h"
#include "nf4/nf4_hd.h"
#include "paging/bitshuffle.h"
#include "paging/blob_hd.h"
#include "paging/crc32c.h"
#ifdef FORGE_RT_HAS_NVCOMP
#include "paging/codec.h"
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

void register_nf4_hooks(py::module_& t) {
  t.def("nf4_quantize_scaled", [](float x, int qtype) {
          float mids[15];
          forge_nf4::fill_midpoints(mids, qtype);
          return forge_nf4::quantize_scaled(x, mids, qtype);
        },
        "nearest 4-bit code of a value already scaled into [-1, 1], from nf4_hd.h");
}

void register_paging_hooks(py::module_& t) {
  t.def("stored_field", &stored_field, py::arg("comp_len"), py::arg("raw_len"));
  t.def("crc32c_hd", [](uintptr_t src, uint64_t n) { return crc32c_update(0, ptr<const uint8_t>(src), n); },
        py::arg("src"), py::arg("n"), "the GPU kernels' bitwise CRC-32C, run on the CPU");
  t.def("crc32c_table", [](uintptr_t src, uint64_t n) { return crc32c_table(ptr<const uint8_t>(src), n); },
        py::arg("src"), py::arg("n"), "the byte-table CRC-32C used where the CPU has no CRC instructions");
  t.def("compact_reference", &compact_reference, py::arg("slots"), py::arg("stored"), py::arg("slot_bytes"),
        py::arg("blob"), py::arg("lanes"),
        "plan offsets and copy chunk payloads with the CUDA kernel's __host__ __device__ code; -> (offsets, total)");
  t.def("bitshuffle",
        [](uintptr_t src, uintptr_t dst, size_t n, size_t width, bool simd) {
          std::vector<uint8_t> tmp(n * width);
          bitshuffle(ptr<const uint8_t>(src), ptr<uint8_t>(dst), tmp.data(), n, width, simd);
        },
        py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("width"), py::arg("simd") = true);
  t.def("bitunshuffle",
        [](uintptr_t src, uintptr_t dst, size_t n, size_t width, bool simd) {
          std::vector<uint8_t> tmp(n * width);
          bitunshuffle(ptr<const uint8_t>(src), ptr<uint8_t>(dst), tmp.data(), n, width, simd);
        },
        py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("width"), py::arg("simd") = true);
#ifdef FORGE_RT_HAS_NVCOMP
  // The last compress()'s scratch slots and stored fields, the inputs of the compaction reference.
  t.def("codec_last_slots", [](const Codec& c) {
    return py::bytes(reinterpret_cast<const char*>(c.slots().data()), c.slots().size());
  });
  t.def("codec_last_stored", [](const Codec& c) {
    std::vector<uint32_t> s;
    for (const auto& e : c.entries()) s.push_back(e.stored);
    return s;
  });
#endif
}

}  // namespace

// After register_paging: the codec hooks take its Codec type.
void register_testing(py::module_& m) {
  auto t = m.def_submodule("testing", "hooks for tests and benches only (not used by forge_rt itself)");
  t.def("set_cpu_path", [](const std::string& name) { forge_cpu::select(name.c_str()); }, py::arg("name"),
        "switch the CPU paths as FORGE_RT_CPU_PATH does at load: auto, generic or avx2");
  register_nf4_hooks(t);
  register_paging_hooks(t);
}
