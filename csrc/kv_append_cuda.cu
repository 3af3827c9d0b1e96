// CUDA kv_append: a bandwidth-bound scatter of [B, T, H, D] rows into [B, Lmax, H, D] caches.
// The copy is a bit copy (cache and new rows share a dtype), done in the widest vector
// (16/8/4/2 bytes) that every pointer and stride allows.
#include <cuda_runtime.h>

#include <algorithm>

#include "common.h"

namespace hk {
namespace {

template <typename Vec, bool kContiguous>
__global__ void kv_append_kernel(KvAppendArgs a, int64_t chunks_per_row) {
  const int64_t total = a.B * a.T * a.H * chunks_per_row;
  const int64_t es = a.elem_size;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % chunks_per_row;
    int64_t r = i / chunks_per_row;
    const int64_t h = r % a.H;
    r /= a.H;
    const int64_t t = r % a.T;
    const int64_t b = r / a.T;
    const int64_t pos = a.positions_dtype == kInt32
                            ? int64_t(static_cast<const int32_t*>(a.positions)[b])
                            : static_cast<const int64_t*>(a.positions)[b];
    if (pos < 0 || pos + a.T > a.Lmax) continue;  // validated on the host; never write out of bounds
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

template <typename Vec, bool kContiguous>
void launch(const KvAppendArgs& a, cudaStream_t stream) {
  const int64_t chunks = kContiguous ? a.D * a.elem_size / int64_t(sizeof(Vec)) : a.D;
  const int64_t total = a.B * a.T * a.H * chunks;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 1 << 20);
  kv_append_kernel<Vec, kContiguous><<<unsigned(blocks), threads, 0, stream>>>(a, chunks);
}

}  // namespace

void kv_append_cuda(const KvAppendArgs& a, int device, uintptr_t stream_handle) {
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("kv_append: cannot select CUDA device: ") +
                             cudaGetErrorString(err));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (vectorizable(a, 16)) launch<uint4, true>(a, stream);
  else if (vectorizable(a, 8)) launch<uint2, true>(a, stream);
  else if (vectorizable(a, 4)) launch<uint32_t, true>(a, stream);
  else if (vectorizable(a, 2)) launch<uint16_t, true>(a, stream);
  else if (a.elem_size == 4) launch<uint32_t, false>(a, stream);
  else launch<uint16_t, false>(a, stream);
  err = cudaGetLastError();
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("kv_append: CUDA kernel launch failed: ") +
                             cudaGetErrorString(err));
}

}  // namespace hk
