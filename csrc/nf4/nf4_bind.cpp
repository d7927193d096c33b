// Python bindings for the nf4 capability (kept thin: argument checks and pointer casts only).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_nf4(py::module_& m) { (void)m; }
