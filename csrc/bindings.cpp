// pybind11 module aimkp._C: every entry point takes raw pointers (tensor.data_ptr()), sizes,
// strides and dtype codes, releases the GIL, and returns nothing. No libtorch.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "aimkp native kernels (C++17/OpenMP CPU; CUDA when built with nvcc)";
  m.def(
      "has_cuda",
      []() {
#ifdef AIMKP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled in.");
  m.def("max_threads", &aimkp::max_threads, "OpenMP threads the CPU kernels use.");
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("masked_embedding_forward_cpu", &aimkp::masked_embedding_forward_cpu, nogil,
        py::arg("out"), py::arg("src"), py::arg("K"), py::arg("D"), py::arg("weight"),
        py::arg("V"), py::arg("weight_stride"), py::arg("image"), py::arg("M"),
        py::arg("image_stride"), py::arg("fill"), py::arg("dtype"), py::arg("threads") = 0);
  m.def("masked_embedding_backward_cpu", &aimkp::masked_embedding_backward_cpu, nogil,
        py::arg("grad"), py::arg("K"), py::arg("D"), py::arg("sorted_src"), py::arg("perm"),
        py::arg("grad_weight"), py::arg("V"), py::arg("grad_image"), py::arg("M"),
        py::arg("grad_fill"), py::arg("dtype"), py::arg("threads") = 0);
#ifdef AIMKP_WITH_CUDA
  m.def("masked_embedding_forward_cuda", &aimkp::masked_embedding_forward_cuda, nogil,
        py::arg("out"), py::arg("src"), py::arg("K"), py::arg("D"), py::arg("weight"),
        py::arg("V"), py::arg("weight_stride"), py::arg("image"), py::arg("M"),
        py::arg("image_stride"), py::arg("fill"), py::arg("dtype"), py::arg("stream"));
  m.def("masked_embedding_backward_atomic_cuda", &aimkp::masked_embedding_backward_atomic_cuda,
        nogil, py::arg("grad"), py::arg("src"), py::arg("K"), py::arg("D"),
        py::arg("grad_weight32"), py::arg("V"), py::arg("grad_image"), py::arg("M"),
        py::arg("grad_fill32"), py::arg("dtype"), py::arg("stream"));
  m.def("masked_embedding_backward_segments_cuda",
        &aimkp::masked_embedding_backward_segments_cuda, nogil, py::arg("grad"),
        py::arg("sorted_src"), py::arg("perm"), py::arg("seg_start"), py::arg("S"), py::arg("D"),
        py::arg("grad_weight"), py::arg("V"), py::arg("grad_image"), py::arg("M"),
        py::arg("grad_fill32"), py::arg("dtype"), py::arg("stream"));
#endif
}
