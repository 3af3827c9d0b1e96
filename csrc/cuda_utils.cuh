// Device-side helpers shared by the CUDA kernels of _C: float conversions of the storage types,
// 16-byte vector unpacking, a device guard and launch-error checking.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <stdexcept>
#include <string>

namespace hk {

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The 16 / sizeof(T) values of T held in a 16-byte vector, as floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&f)[16 / sizeof(T)]);

template <>
__device__ __forceinline__ void unpack16<float>(const uint4& raw, float (&f)[4]) {
  f[0] = __uint_as_float(raw.x);
  f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z);
  f[3] = __uint_as_float(raw.w);
}

template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& raw, float (&f)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& raw, float (&f)[8]) {
  // bf16 -> f32 is a 16-bit shift: no conversion instruction needed.
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// `N` values of T stored together, aligned to their size (vector loads and stores).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Selects `device` for the lifetime of the guard, restoring the previous one afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    cudaError_t err = cudaGetDevice(&previous_);
    if (err == cudaSuccess && previous_ != device) err = cudaSetDevice(device);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string(op) + ": cannot select CUDA device " +
                               std::to_string(device) + ": " + cudaGetErrorString(err));
    changed_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

// Throws std::runtime_error (Python RuntimeError) when the last launch failed.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA kernel launch failed: " +
                             cudaGetErrorString(err));
}

// A per-device cache of an int property (computed once per device; 0 = not computed yet).
template <typename F>
int cached_per_device(std::atomic<int> (&cache)[64], int device, F compute) {
  if (device < 0 || device >= 64) return compute();
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = compute();
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

}  // namespace hk
