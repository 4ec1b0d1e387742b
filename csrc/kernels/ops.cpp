// scratchformer._kernels: registers scratchformer's ops with PyTorch.
//
// The only file that sees torch, and only its stable ABI (torch/csrc/stable), so one build loads
// in every torch from the version it targets on (setup.py sets TORCH_TARGET_VERSION). Each op
// here checks its inputs, allocates outputs and launches a kernel declared in kernels.h. Fake
// (meta) implementations and autograd are registered from Python (scratchformer/ops).
#include <Python.h>  // limited API (Py_LIMITED_API is set by setup.py)

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include "kernels.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

void check_pair(const char* op, const Tensor& a, const Tensor& b) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), op,
                  ": a and b must have the same dtype; cast one of them first");
  STD_TORCH_CHECK(a.get_device() == b.get_device() && a.is_cuda() == b.is_cuda(), op,
                  ": a and b must be on the same device");
  STD_TORCH_CHECK(a.dim() == b.dim(), op, ": a and b must have the same shape (got ", a.dim(),
                  " and ", b.dim(), " dimensions); broadcast explicitly with expand() first");
  for (int64_t d = 0; d < a.dim(); ++d) {
    STD_TORCH_CHECK(a.size(d) == b.size(d), op, ": a and b must have the same shape (size ",
                    a.size(d), " vs ", b.size(d), " at dim ", d,
                    "); broadcast explicitly with expand() first");
  }
}

template <typename T>
void scaled_add_loop(const T* a, const T* b, T alpha, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + alpha * b[i];
}

Tensor scaled_add_cpu(Tensor a, Tensor b, double alpha) {
  check_pair("scaled_add", a, b);
  a = torch::stable::contiguous(a);
  b = torch::stable::contiguous(b);
  Tensor out = torch::stable::empty_like(a);
  const int64_t n = a.numel();
  switch (a.scalar_type()) {
    case ScalarType::Float:
      scaled_add_loop(static_cast<const float*>(a.data_ptr()),
                      static_cast<const float*>(b.data_ptr()), float(alpha),
                      static_cast<float*>(out.data_ptr()), n);
      break;
    case ScalarType::Double:
      scaled_add_loop(static_cast<const double*>(a.data_ptr()),
                      static_cast<const double*>(b.data_ptr()), alpha,
                      static_cast<double*>(out.data_ptr()), n);
      break;
    default:
      STD_TORCH_CHECK(false, "scaled_add on CPU supports float32 and float64, got ",
                      a.scalar_type());
  }
  return out;
}

#ifdef SCRATCHFORMER_CUDA
scratchformer::DType cuda_dtype(const char* op, ScalarType t) {
  switch (t) {
    case ScalarType::Float: return scratchformer::DType::kFloat32;
    case ScalarType::Half: return scratchformer::DType::kFloat16;
    case ScalarType::BFloat16: return scratchformer::DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false, op, " on CUDA supports float32, float16 and bfloat16, got ", t);
  }
  return scratchformer::DType::kFloat32;
}

void* current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return stream;
}

Tensor scaled_add_cuda(Tensor a, Tensor b, double alpha) {
  check_pair("scaled_add", a, b);
  const auto dtype = cuda_dtype("scaled_add", a.scalar_type());
  torch::stable::accelerator::DeviceGuard guard(a.get_device_index());
  a = torch::stable::contiguous(a);
  b = torch::stable::contiguous(b);
  Tensor out = torch::stable::empty_like(a);
  const char* err = scratchformer::launch_scaled_add(dtype, a.data_ptr(), b.data_ptr(),
                                                     float(alpha), out.data_ptr(), a.numel(),
                                                     current_stream(a));
  STD_TORCH_CHECK(err == nullptr, "scaled_add: CUDA launch failed: ", err);
  return out;
}
#endif

}  // namespace

STABLE_TORCH_LIBRARY(scratchformer, m) {
  m.def("scaled_add(Tensor a, Tensor b, float alpha) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(scratchformer, CPU, m) {
  m.impl("scaled_add", TORCH_BOX(&scaled_add_cpu));
}

#ifdef SCRATCHFORMER_CUDA
STABLE_TORCH_LIBRARY_IMPL(scratchformer, CUDA, m) {
  m.impl("scaled_add", TORCH_BOX(&scaled_add_cuda));
}
#endif

// A Python module too, so `import scratchformer._kernels` loads the library (which registers the
// ops above) and tells what was compiled into it.
namespace {

PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef SCRATCHFORMER_CUDA
  int archs[32];
  const int n = scratchformer::compiled_cuda_archs(archs, 32);
  PyObject* out = PyTuple_New(n < 32 ? n : 32);
  for (int i = 0; i < n && i < 32; ++i) PyTuple_SetItem(out, i, PyLong_FromLong(archs[i]));
  return out;
#else
  return PyTuple_New(0);
#endif
}

PyObject* cuda_version(PyObject*, PyObject*) {
#ifdef SCRATCHFORMER_CUDA
  const int v = scratchformer::compiled_cuda_version();
  return PyUnicode_FromFormat("%d.%d", v / 1000, (v % 1000) / 10);
#else
  Py_RETURN_NONE;
#endif
}

PyObject* torch_version(PyObject*, PyObject*) {
  return PyUnicode_FromFormat("%d.%d.%d", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                              TORCH_VERSION_PATCH);
}

PyMethodDef methods[] = {
    {"cuda_archs", cuda_archs, METH_NOARGS,
     "Compute capabilities the CUDA kernels were compiled for (e.g. (80, 90)); () without CUDA."},
    {"cuda_version", cuda_version, METH_NOARGS,
     "CUDA version the kernels were compiled with, or None without CUDA."},
    {"torch_version", torch_version, METH_NOARGS, "torch version whose headers built this."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_kernels", "scratchformer's registered ops",
                          -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module_def); }
