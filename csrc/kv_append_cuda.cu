// CUDA kv_append: a bandwidth-bound scatter of [B, T, H, D] rows into [B, Lmax, H, D] caches.
// Without RoPE the copy is a bit copy (cache and new rows share a dtype), done in the widest
// vector (16/8/4/2 bytes) that every pointer and stride allows. With RoPE one thread rotates VEC
// pairs (k[i], k[i + D/2]) of a key in float32 (rotate-half, see common.h) and copies the
// matching values, again with the widest vectors the layout allows.
#include <cuda_runtime.h>

#include <algorithm>

#include "common.h"
#include "cuda_utils.cuh"

namespace hk {
namespace {

__device__ __forceinline__ int64_t load_index(const void* p, int dtype, int64_t i) {
  return dtype == kInt32 ? int64_t(static_cast<const int32_t*>(p)[i])
                         : static_cast<const int64_t*>(p)[i];
}

struct Work {
  int64_t b, t, h, c;
};

// Work item i of the [B, T, H, chunks_per_row] grid of one kv_append launch.
__device__ __forceinline__ Work unflatten(const KvAppendArgs& a, int64_t i, int64_t chunks_per_row) {
  const int64_t c = i % chunks_per_row;
  int64_t r = i / chunks_per_row;
  const int64_t h = r % a.H;
  r /= a.H;
  return {r / a.T, r % a.T, h, c};
}

template <typename Vec, bool kContiguous>
__global__ void kv_append_kernel(KvAppendArgs a, int64_t chunks_per_row) {
  const int64_t total = a.B * a.T * a.H * chunks_per_row;
  const int64_t es = a.elem_size;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Work w = unflatten(a, i, chunks_per_row);
    const int64_t b = w.b, t = w.t, h = w.h, c = w.c;
    const int64_t pos = load_index(a.positions, a.positions_dtype, b);
    if (!slots_fit(pos, a.T, a.Lmax)) continue;  // validated on the host; never write out of bounds
    // Byte offset of chunk c: sizeof(Vec) consecutive bytes when the last dim is contiguous,
    // else Vec is one element and c the element index.
    auto at = [&](const View4& v, int64_t seq) {
      return es * (b * v.stride[0] + seq * v.stride[1] + h * v.stride[2]) +
             (kContiguous ? c * int64_t(sizeof(Vec)) : es * c * v.stride[3]);
    };
    auto* k_dst = static_cast<char*>(a.k_cache.data) + at(a.k_cache, pos + t);
    auto* v_dst = static_cast<char*>(a.v_cache.data) + at(a.v_cache, pos + t);
    *reinterpret_cast<Vec*>(k_dst) = *reinterpret_cast<const Vec*>(static_cast<const char*>(a.k_new.data) + at(a.k_new, t));
    *reinterpret_cast<Vec*>(v_dst) = *reinterpret_cast<const Vec*>(static_cast<const char*>(a.v_new.data) + at(a.v_new, t));
  }
}

// True when every view's base and outer strides are multiples of `bytes` and rows are contiguous.
bool vectorizable(const KvAppendArgs& a, int64_t bytes) {
  if ((a.D * a.elem_size) % bytes) return false;
  for (const View4* v : {&a.k_cache, &a.v_cache, &a.k_new, &a.v_new}) {
    if (v->stride[3] != 1 || reinterpret_cast<uintptr_t>(v->data) % bytes) return false;
    for (int i = 0; i < 3; ++i)
      if ((v->stride[i] * a.elem_size) % bytes) return false;
  }
  return true;
}

// One thread per (row, token, head, VEC-pair chunk): rotates k[c*VEC ..] with k[half + c*VEC ..]
// and copies the same elements of v. VEC > 1 only when the last dims are contiguous.
template <typename T, int VEC>
__global__ void kv_append_rope_kernel(KvAppendArgs a, int64_t chunks_per_row) {
  using V = Vec<T, VEC>;
  using F = Vec<float, VEC>;
  const int64_t half = a.D / 2;
  const int64_t total = a.B * a.T * a.H * chunks_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Work w = unflatten(a, i, chunks_per_row);
    const int64_t b = w.b, t = w.t, h = w.h, c = w.c;
    const int64_t pos = load_index(a.positions, a.positions_dtype, b);
    const int64_t start = load_index(a.rope_positions, a.rope_positions_dtype,
                                     b * a.rope_pos_stride[0] + t * a.rope_pos_stride[1]);
    const int64_t offset = t * a.rope_pos_step;
    // Validated on the host; never read or write out of bounds (overflow-safe checks).
    if (!slots_fit(pos, a.T, a.Lmax) || !row_in_table(start, offset, a.rope_rows)) continue;
    const int64_t p = start + offset;
    auto elem = [&](const View4& v, int64_t seq, int64_t e) {
      return static_cast<T*>(v.data) + b * v.stride[0] + seq * v.stride[1] + h * v.stride[2] +
             e * v.stride[3];
    };
    const int64_t e0 = c * VEC;
    const F cs = *reinterpret_cast<const F*>(a.rope_cos + p * a.rope_row_stride + e0);
    const F sn = *reinterpret_cast<const F*>(a.rope_sin + p * a.rope_row_stride + e0);
    const V k1 = *reinterpret_cast<const V*>(elem(a.k_new, t, e0));
    const V k2 = *reinterpret_cast<const V*>(elem(a.k_new, t, e0 + half));
    V lo, hi;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x1 = to_f32(k1.v[e]), x2 = to_f32(k2.v[e]);
      lo.v[e] = from_f32<T>(x1 * cs.v[e] - x2 * sn.v[e]);
      hi.v[e] = from_f32<T>(x2 * cs.v[e] + x1 * sn.v[e]);
    }
    *reinterpret_cast<V*>(elem(a.k_cache, pos + t, e0)) = lo;
    *reinterpret_cast<V*>(elem(a.k_cache, pos + t, e0 + half)) = hi;
    *reinterpret_cast<V*>(elem(a.v_cache, pos + t, e0)) =
        *reinterpret_cast<const V*>(elem(a.v_new, t, e0));
    *reinterpret_cast<V*>(elem(a.v_cache, pos + t, e0 + half)) =
        *reinterpret_cast<const V*>(elem(a.v_new, t, e0 + half));
  }
}

// Largest VEC (elements per vector, <= 16 bytes) every RoPE-path pointer and stride allows.
int rope_vector_width(const KvAppendArgs& a) {
  const int64_t half = a.D / 2;
  for (int64_t vec = 16 / a.elem_size; vec > 1; vec /= 2) {
    bool ok = half % vec == 0 && a.rope_row_stride % vec == 0 &&
              reinterpret_cast<uintptr_t>(a.rope_cos) % (4 * vec) == 0 &&
              reinterpret_cast<uintptr_t>(a.rope_sin) % (4 * vec) == 0;
    for (const View4* v : {&a.k_cache, &a.v_cache, &a.k_new, &a.v_new}) {
      ok = ok && v->stride[3] == 1 && reinterpret_cast<uintptr_t>(v->data) % (vec * a.elem_size) == 0;
      for (int i = 0; i < 3; ++i) ok = ok && v->stride[i] % vec == 0;
    }
    if (ok) return int(vec);
  }
  return 1;
}

int grid_for(int64_t total, int threads) {
  return int(std::min<int64_t>((total + threads - 1) / threads, 1 << 20));
}

template <typename T>
void launch_rope(const KvAppendArgs& a, cudaStream_t stream) {
  const int vec = rope_vector_width(a);
  const int64_t chunks = a.D / 2 / vec;
  const int threads = 256;
  const int blocks = grid_for(a.B * a.T * a.H * chunks, threads);
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) == 2) {
        kv_append_rope_kernel<T, 8><<<blocks, threads, 0, stream>>>(a, chunks);
        break;
      }
      [[fallthrough]];
    case 4: kv_append_rope_kernel<T, 4><<<blocks, threads, 0, stream>>>(a, chunks); break;
    case 2: kv_append_rope_kernel<T, 2><<<blocks, threads, 0, stream>>>(a, chunks); break;
    default: kv_append_rope_kernel<T, 1><<<blocks, threads, 0, stream>>>(a, chunks); break;
  }
}

template <typename Vec, bool kContiguous>
void launch(const KvAppendArgs& a, cudaStream_t stream) {
  const int64_t chunks = kContiguous ? a.D * a.elem_size / int64_t(sizeof(Vec)) : a.D;
  const int threads = 256;
  const int blocks = grid_for(a.B * a.T * a.H * chunks, threads);
  kv_append_kernel<Vec, kContiguous><<<blocks, threads, 0, stream>>>(a, chunks);
}

}  // namespace

void kv_append_cuda(const KvAppendArgs& a, int device, uintptr_t stream_handle) {
  DeviceGuard guard(device, "kv_append");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (a.rope_cos != nullptr) {
    switch (a.dtype) {
      case kFloat32: launch_rope<float>(a, stream); break;
      case kFloat16: launch_rope<__half>(a, stream); break;
      default: launch_rope<__nv_bfloat16>(a, stream); break;
    }
  } else if (vectorizable(a, 16)) {
    launch<uint4, true>(a, stream);
  } else if (vectorizable(a, 8)) {
    launch<uint2, true>(a, stream);
  } else if (vectorizable(a, 4)) {
    launch<uint32_t, true>(a, stream);
  } else if (vectorizable(a, 2)) {
    launch<uint16_t, true>(a, stream);
  } else if (a.elem_size == 4) {
    launch<uint32_t, false>(a, stream);
  } else {
    launch<uint16_t, false>(a, stream);
  }
  check_launch("kv_append");
}

}  // namespace hk
