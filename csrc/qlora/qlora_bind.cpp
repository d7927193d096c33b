// Python bindings for the qlora capability (kept thin: argument checks and pointer casts only).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_qlora(py::module_& m) { (void)m; }
