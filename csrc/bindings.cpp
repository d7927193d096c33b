// forge_rt._C: thin pybind11 entry point. Each capability registers its own functions; the
// module takes raw pointers and sizes (no libtorch link), so it survives torch upgrades.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_path.h"
#include "paging/crc32c.h"

namespace py = pybind11;

void register_nf4(py::module_& m);
void register_qlora(py::module_& m);
void register_paging(py::module_& m);
void register_testing(py::module_& m);
void register_kquant(py::module_& m);

static py::dict build_info() {
  py::dict d;
#ifdef FORGE_RT_HAS_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef FORGE_RT_HAS_NVCOMP
  d["nvcomp"] = true;
#else
  d["nvcomp"] = false;
#endif
#ifdef _OPENMP
  d["openmp_threads"] = omp_get_max_threads();
#else
  d["openmp_threads"] = 1;
#endif
  return d;
}

static py::dict cpu_features() {
  py::dict d;
  d["simd"] = forge_cpu::simd();
  d["crc32c"] = forge_paging::crc32c_path();
  d["selected"] = forge_cpu::selected();
  d["available"] = forge_cpu::available();
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "forge_rt native kernels (C++ always; CUDA when built with a toolkit)";
  forge_cpu::select(std::getenv("FORGE_RT_CPU_PATH"));  // a bad value fails the import, naming the variable
  m.def("build_info", &build_info, "what this build of forge_rt._C contains");
  m.def("cpu_features", &cpu_features,
        "the CPU paths running (simd: generic / avx2 / neon, crc32c: sse4.2 / armv8 / table), the selection "
        "(FORGE_RT_CPU_PATH) and the SIMD paths available here");
  register_nf4(m);
  register_qlora(m);
  register_paging(m);
  register_testing(m);
  register_kquant(m);
}
