// Python bindings for the paging capability (kept thin: argument checks and pointer casts only).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_paging(py::module_& m) { (void)m; }
