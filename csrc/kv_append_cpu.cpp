// C++ implementation of kv_append for host memory: the reference the CUDA kernel is tested
// against on a GPU, and the path CI and CPU-only users exercise.
#include <cstring>

#include "common.h"

namespace hk {

static int64_t read_position(const KvAppendArgs& a, int64_t b) {
  return a.positions_dtype == kInt32 ? static_cast<const int32_t*>(a.positions)[b]
                                     : static_cast<const int64_t*>(a.positions)[b];
}

static void copy_rows(const View4& dst, const View4& src, const KvAppendArgs& a, int64_t b,
                      int64_t pos) {
  auto* out = static_cast<char*>(dst.data);
  const auto* in = static_cast<const char*>(src.data);
  const int64_t es = a.elem_size;
  for (int64_t t = 0; t < a.T; ++t) {
    for (int64_t h = 0; h < a.H; ++h) {
      char* o = out + es * (b * dst.stride[0] + (pos + t) * dst.stride[1] + h * dst.stride[2]);
      const char* i = in + es * (b * src.stride[0] + t * src.stride[1] + h * src.stride[2]);
      if (dst.stride[3] == 1 && src.stride[3] == 1) {
        std::memcpy(o, i, static_cast<size_t>(es * a.D));
      } else {
        for (int64_t d = 0; d < a.D; ++d)
          std::memcpy(o + es * d * dst.stride[3], i + es * d * src.stride[3], es);
      }
    }
  }
}

void kv_append_cpu(const KvAppendArgs& a) {
  // Check every position before writing anything: a bad row leaves the caches untouched.
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t pos = read_position(a, b);
    if (pos < 0 || pos + a.T > a.Lmax) {
      std::ostringstream os;
      os << "kv_append: positions[" << b << "] = " << pos << " with " << a.T
         << " new tokens does not fit a cache of length " << a.Lmax;
      throw std::out_of_range(os.str());
    }
  }
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t pos = read_position(a, b);
    copy_rows(a.k_cache, a.k_new, a, b, pos);
    copy_rows(a.v_cache, a.v_new, a, b, pos);
  }
}

}  // namespace hk
