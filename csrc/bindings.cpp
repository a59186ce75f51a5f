// Python bindings of kdfast._C (one module for every C++ kernel; the ops call these through
// kdfast.backends.cpp_module()). The GIL is released while the kernels run.
#include <torch/extension.h>

#include "kd_loss.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast C++ CPU kernels";
  m.def("kd_loss_fwd", &kdfast::kd_loss_fwd,
        "Fused KD loss forward on CPU: (loss (N,) or 0-d by reduction, gradient (N, C) or empty, stats (6, N) or "
        "empty)",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("weight"), py::arg("alpha"),
        py::arg("temperature"), py::arg("ignore_index"), py::arg("reduction"), py::arg("need_grad"),
        py::arg("return_stats"), py::arg("grad_out"), py::arg("validate"), py::arg("divergence") = 0,
        py::arg("beta") = 0.5, py::arg("normalizer") = py::none(), py::arg("topk_ids") = py::none(),
        py::arg("topk_logprobs") = py::none(), py::arg("topk_ratio") = 1.0, py::arg("topk_tail") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("kd_loss_autograd", &kdfast::kd_loss_autograd,
        "Fused KD loss forward on CPU as one autograd node whose backward runs in C++: (loss, stats)",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("weight"), py::arg("alpha"),
        py::arg("temperature"), py::arg("ignore_index"), py::arg("reduction"), py::arg("return_stats"),
        py::arg("inplace"), py::arg("validate"), py::call_guard<py::gil_scoped_release>());
  m.def("kd_loss_bwd", &kdfast::kd_loss_bwd,
        "Fused KD loss backward: grad *= grad_output in place (0-d scalar or one factor per row)",
        py::arg("grad"), py::arg("grad_output"), py::call_guard<py::gil_scoped_release>());
}
