// pybind11 bindings of hybridkernels._C. Every function takes raw pointers, sizes, strides
// (in elements), a dtype code and, for CUDA, the device index and stream handle as plain
// integers, checks all of them, and raises ValueError / IndexError / RuntimeError instead of
// crashing. hybridkernels/_cuda.py is the only intended caller.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#ifdef HK_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "common.h"

namespace py = pybind11;

namespace hk {
namespace {

#ifndef HK_CUDA_ARCHS
#define HK_CUDA_ARCHS ""
#endif

View4 make_view(const char* name, uintptr_t ptr, const std::vector<int64_t>& strides) {
  HK_CHECK(ptr != 0, name, ": null data pointer");
  HK_CHECK(strides.size() == 4, name, ": expected 4 strides, got ", strides.size());
  View4 v{reinterpret_cast<void*>(ptr), {}};
  for (int i = 0; i < 4; ++i) {
    HK_CHECK(strides[i] >= 0, name, ": negative stride ", strides[i], " in dim ", i);
    v.stride[i] = strides[i];
  }
  return v;
}

#ifdef HK_WITH_CUDA
void check_device_pointer(const char* name, const void* ptr, int device) {
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later launches are unaffected
    fail(name, ": not a CUDA pointer (", cudaGetErrorString(err), ")");
  }
  HK_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, name,
           ": expected device memory on cuda:", device, ", got host memory");
  HK_CHECK(attr.device == device, name, ": memory is on cuda:", attr.device, ", expected cuda:",
           device);
}
#endif

void kv_append(uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
               uintptr_t positions, const std::vector<int64_t>& cache_shape, int64_t T,
               const std::vector<int64_t>& k_cache_strides,
               const std::vector<int64_t>& v_cache_strides,
               const std::vector<int64_t>& k_new_strides,
               const std::vector<int64_t>& v_new_strides, int dtype, int positions_dtype,
               int device, uintptr_t stream) {
  HK_CHECK(cache_shape.size() == 4, "cache_shape: expected [B, Lmax, H, D], got ",
           cache_shape.size(), " dims");
  KvAppendArgs a{};
  a.B = cache_shape[0];
  a.Lmax = cache_shape[1];
  a.H = cache_shape[2];
  a.D = cache_shape[3];
  a.T = T;
  HK_CHECK(a.B > 0 && a.Lmax > 0 && a.H > 0 && a.D > 0, "cache_shape: every size must be >= 1");
  HK_CHECK(T >= 1, "T: expected >= 1 new tokens, got ", T);
  HK_CHECK(T <= a.Lmax, "T: ", T, " new tokens exceed the cache length ", a.Lmax);
  HK_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
           "dtype: expected a float code (0, 1, 2), got ", dtype);
  HK_CHECK(positions_dtype == kInt32 || positions_dtype == kInt64,
           "positions_dtype: expected int32 (3) or int64 (4), got ", positions_dtype);
  HK_CHECK(positions != 0, "positions: null data pointer");
  HK_CHECK(device >= -1, "device: expected -1 (CPU) or a CUDA device index, got ", device);
  a.k_cache = make_view("k_cache", k_cache, k_cache_strides);
  a.v_cache = make_view("v_cache", v_cache, v_cache_strides);
  a.k_new = make_view("k_new", k_new, k_new_strides);
  a.v_new = make_view("v_new", v_new, v_new_strides);
  a.positions = reinterpret_cast<const void*>(positions);
  a.positions_dtype = positions_dtype;
  a.elem_size = dtype_size(dtype);

  if (device < 0) {
    py::gil_scoped_release release;
    kv_append_cpu(a);
    return;
  }
#ifdef HK_WITH_CUDA
  check_device_pointer("k_cache", a.k_cache.data, device);
  check_device_pointer("v_cache", a.v_cache.data, device);
  check_device_pointer("k_new", a.k_new.data, device);
  check_device_pointer("v_new", a.v_new.data, device);
  check_device_pointer("positions", a.positions, device);
  kv_append_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error(
      "kv_append: hybridkernels._C was built without CUDA; reinstall with nvcc available "
      "(see `hybridkernels info`)");
#endif
}

py::dict build_info() {
  py::dict info;
#ifdef HK_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda"] = false;
  info["cuda_runtime_version"] = py::none();
#endif
  info["cuda_archs"] = std::string(HK_CUDA_ARCHS);
  info["cxx"] = std::string(__VERSION__);
  return info;
}

}  // namespace
}  // namespace hk

PYBIND11_MODULE(_C, m) {
  m.doc() = "hybridkernels compiled kernels (pybind11; CUDA + C++ CPU implementation)";
  m.def("kv_append", &hk::kv_append, py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"),
        py::arg("v_new"), py::arg("positions"), py::arg("cache_shape"), py::arg("T"),
        py::arg("k_cache_strides"), py::arg("v_cache_strides"), py::arg("k_new_strides"),
        py::arg("v_new_strides"), py::arg("dtype"), py::arg("positions_dtype"),
        py::arg("device"), py::arg("stream") = 0,
        "Write T new K/V rows per sequence into [B, Lmax, H, D] caches at positions[b].");
  m.def("build_info", &hk::build_info, "What this build of _C contains.");
}
