// Python bindings of kdfast._C (one module for every C++ kernel; the ops call these through
// kdfast.backends.cpp_module()). The GIL is released while the kernels run.
#include <torch/extension.h>

#include "kd_loss.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast C++ CPU kernels";
  m.def("kd_loss_fwd", &kdfast::kd_loss_fwd,
        "Fused KD loss forward on CPU: (loss rows (N,), gradient (N, C) or empty, stats (6, N) or empty)",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("weight"), py::arg("grad_scale"),
        py::arg("alpha"), py::arg("temperature"), py::arg("ignore_index"), py::arg("need_grad"),
        py::arg("return_stats"), py::arg("grad_out"), py::call_guard<py::gil_scoped_release>());
  m.def("kd_loss_bwd", &kdfast::kd_loss_bwd,
        "Fused KD loss backward: grad *= grad_output in place (0-d scalar or one factor per row)",
        py::arg("grad"), py::arg("grad_output"), py::call_guard<py::gil_scoped_release>());
}
