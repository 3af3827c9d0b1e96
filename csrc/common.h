// Shared definitions of the hybridkernels._C extension: dtype codes, argument checks,
// and the plain-old-data descriptions of tensors that the bindings hand to the kernels.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace hk {

// Must match hybridkernels/_cuda.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4 };

inline int64_t dtype_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    case kInt32: return 4;
    case kInt64: return 8;
    default: return 0;
  }
}

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kInt32: return "int32";
    case kInt64: return "int64";
    default: return "unknown";
  }
}

// std::invalid_argument reaches Python as ValueError, std::runtime_error as RuntimeError.
template <typename... Args>
[[noreturn]] inline void fail(Args&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

#define HK_CHECK(cond, ...)          \
  do {                               \
    if (!(cond)) ::hk::fail(__VA_ARGS__); \
  } while (0)

// A 4-d strided view: [d0, d1, d2, d3] with strides in elements.
struct View4 {
  void* data;
  int64_t stride[4];
};

// Arguments of kv_append after validation. Caches are [B, Lmax, H, D], new rows [B, T, H, D];
// row b's tokens go to slots positions[b] .. positions[b] + T - 1.
struct KvAppendArgs {
  View4 k_cache, v_cache, k_new, v_new;
  const void* positions;
  int positions_dtype;  // kInt32 or kInt64
  int64_t B, T, Lmax, H, D;
  int64_t elem_size;
};

void kv_append_cpu(const KvAppendArgs& a);
#ifdef HK_WITH_CUDA
// Launches on `stream`; throws std::runtime_error with the CUDA error string on failure.
void kv_append_cuda(const KvAppendArgs& a, int device, uintptr_t stream);
#endif

}  // namespace hk
