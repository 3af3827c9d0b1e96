// hkemu stand-in for CUDA's cuda_runtime.h: the runtime API csrc/ calls, as host functions over
// the emulated devices of hkemu.h (host memory is device memory, streams run synchronously).
#pragma once

#include <stdlib.h>
#include <string.h>

#include "../hkemu.h"

#define CUDART_VERSION 12040

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
};

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

inline cudaError_t cudaGetLastError() {
  const auto err = cudaError_t(hkemu::last_error());
  hkemu::last_error() = cudaSuccess;
  return err;
}
inline cudaError_t cudaPeekAtLastError() { return cudaError_t(hkemu::last_error()); }

inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = hkemu::kMaxDevices;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = hkemu::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= hkemu::kMaxDevices) return hkemu::last_error() = cudaErrorInvalidDevice, cudaErrorInvalidDevice;
  hkemu::set_current_device(device);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= hkemu::kMaxDevices) return hkemu::last_error() = cudaErrorInvalidDevice, cudaErrorInvalidDevice;
  const hkemu::DeviceProps& p = hkemu::device_props(device);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = p.sm_count; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = p.max_threads_per_block; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(p.max_static_shared); return cudaSuccess;
    case cudaDevAttrWarpSize: *value = warpSize; return cudaSuccess;
  }
  return hkemu::last_error() = cudaErrorInvalidValue, cudaErrorInvalidValue;
}

// The emulated occupancy: DeviceProps::blocks_per_sm, or 2048 resident threads per SM.
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads,
                                                          size_t /*dynamic_smem*/) {
  const hkemu::DeviceProps& p = hkemu::device_props(hkemu::current_device());
  if (threads <= 0 || threads > p.max_threads_per_block) return cudaErrorInvalidValue;
  *blocks = p.blocks_per_sm > 0 ? p.blocks_per_sm : 2048 / threads;
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = aligned_alloc(256, (bytes + 255) / 256 * 256);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  memset(dst, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t = nullptr) {
  return cudaMemset(dst, value, bytes);
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
