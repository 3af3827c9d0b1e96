// C++ implementation of kv_append for host memory: the reference the CUDA kernel is tested
// against on a GPU, and the path CI and CPU-only users exercise. Without RoPE the copy is a bit
// copy; with RoPE the keys are rotated in float32 and rounded once to the cache dtype.
#include <cstring>

#include "common.h"
#include "float_convert.h"

namespace hk {

static int64_t read_index(const void* p, int dtype, int64_t i) {
  return dtype == kInt32 ? static_cast<const int32_t*>(p)[i] : static_cast<const int64_t*>(p)[i];
}

static int64_t read_position(const KvAppendArgs& a, int64_t b) {
  return read_index(a.positions, a.positions_dtype, b);
}

// The stored rotary position of (b, t); the table row is that + t * rope_pos_step, checked
// (overflow-safe) by row_in_table before anything is written.
static int64_t rope_start(const KvAppendArgs& a, int64_t b, int64_t t) {
  return read_index(a.rope_positions, a.rope_positions_dtype,
                    b * a.rope_pos_stride[0] + t * a.rope_pos_stride[1]);
}

static int64_t rope_position(const KvAppendArgs& a, int64_t b, int64_t t) {
  return rope_start(a, b, t) + t * a.rope_pos_step;  // validated: no overflow
}

static char* row_ptr(const View4& v, const KvAppendArgs& a, int64_t b, int64_t t, int64_t h) {
  return static_cast<char*>(v.data) +
         a.elem_size * (b * v.stride[0] + t * v.stride[1] + h * v.stride[2]);
}

static void copy_rows(const View4& dst, const View4& src, const KvAppendArgs& a, int64_t b,
                      int64_t pos) {
  const int64_t es = a.elem_size;
  for (int64_t t = 0; t < a.T; ++t) {
    for (int64_t h = 0; h < a.H; ++h) {
      char* o = row_ptr(dst, a, b, pos + t, h);
      const char* i = row_ptr(src, a, b, t, h);
      if (dst.stride[3] == 1 && src.stride[3] == 1) {
        std::memcpy(o, i, static_cast<size_t>(es * a.D));
      } else {
        for (int64_t d = 0; d < a.D; ++d)
          std::memcpy(o + es * d * dst.stride[3], i + es * d * src.stride[3], es);
      }
    }
  }
}

template <typename T>
static void rotate_rows(const KvAppendArgs& a, int64_t b, int64_t pos) {
  const int64_t half = a.D / 2;
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t p = rope_position(a, b, t);
    const float* cos = a.rope_cos + p * a.rope_row_stride;
    const float* sin = a.rope_sin + p * a.rope_row_stride;
    for (int64_t h = 0; h < a.H; ++h) {
      const T* in = reinterpret_cast<const T*>(row_ptr(a.k_new, a, b, t, h));
      T* out = reinterpret_cast<T*>(row_ptr(a.k_cache, a, b, pos + t, h));
      const int64_t si = a.k_new.stride[3], so = a.k_cache.stride[3];
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_float(in[i * si]), x2 = to_float(in[(i + half) * si]);
        const float lo = x1 * cos[i] - x2 * sin[i];
        const float hi = x2 * cos[i] + x1 * sin[i];
        out[i * so] = from_float<T>(lo);
        out[(i + half) * so] = from_float<T>(hi);
      }
    }
  }
}

void kv_append_cpu(const KvAppendArgs& a) {
  // Check every position before writing anything: a bad row leaves the caches untouched.
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t pos = read_position(a, b);
    if (!slots_fit(pos, a.T, a.Lmax)) {
      std::ostringstream os;
      os << "kv_append: positions[" << b << "] = " << pos << " with " << a.T
         << " new tokens does not fit a cache of length " << a.Lmax;
      throw std::out_of_range(os.str());
    }
    for (int64_t t = 0; a.rope_cos != nullptr && t < a.T; ++t) {
      const int64_t start = rope_start(a, b, t), offset = t * a.rope_pos_step;
      if (!row_in_table(start, offset, a.rope_rows)) {
        std::ostringstream os;
        int64_t p = 0;
        os << "kv_append: rotary position ";
        if (__builtin_add_overflow(start, offset, &p))
          os << start << " + " << offset;
        else
          os << p;
        os << " of row " << b << ", token " << t
           << " is outside the RoPE tables' " << a.rope_rows << " rows";
        throw std::out_of_range(os.str());
      }
    }
  }
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t pos = read_position(a, b);
    if (a.rope_cos == nullptr) {
      copy_rows(a.k_cache, a.k_new, a, b, pos);
    } else if (a.dtype == kFloat32) {
      rotate_rows<float>(a, b, pos);
    } else if (a.dtype == kFloat16) {
      rotate_rows<Half>(a, b, pos);
    } else {
      rotate_rows<BFloat16>(a, b, pos);
    }
    copy_rows(a.v_cache, a.v_new, a, b, pos);
  }
}

}  // namespace hk
