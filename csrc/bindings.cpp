// forge_rt._C: thin pybind11 entry point. Each capability registers its own functions; the
// module takes raw pointers and sizes (no libtorch link), so it survives torch upgrades.
#include <pybind11/pybind11.h>
#include <string>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

void register_nf4(py::module_& m);
void register_qlora(py::module_& m);
void register_paging(py::module_& m);
void register_testing(py::module_& m);

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
#ifdef FORGE_RT_AVX2
  d["simd"] = "avx2+fma";
#elif defined(__ARM_NEON)
  d["simd"] = "neon";
#else
  d["simd"] = "generic";
#endif
#ifdef _OPENMP
  d["openmp_threads"] = omp_get_max_threads();
#else
  d["openmp_threads"] = 1;
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "forge_rt native kernels (C++ always; CUDA when built with a toolkit)";
  m.def("build_info", &build_info, "what this build of forge_rt._C contains");
  register_nf4(m);
  register_qlora(m);
  register_paging(m);
  register_testing(m);
}
