// hkemu: a host emulation of the CUDA device model, enough to compile the real csrc/*.cu
// sources with g++ and run their kernels on the CPU under ASan / UBSan (see README.md).
//
// Each launch runs its blocks one after another; each CUDA thread of a block is a fiber
// (ucontext) with its own stack. Fibers run until they reach a synchronisation point
// (__syncthreads, a warp collective such as __shfl_xor_sync) or exit; the scheduler then checks
// that the point is consistent (every thread of the block at the same barrier; every lane named
// in a warp mask at the same collective with the same mask) and releases them, or reports the
// error and exits with status 86 instead of hanging. __shared__ variables live in a per-block
// arena, filled with 0xff bytes (NaN floats, -1 integers) at every block start and fenced by
// ASan-poisoned redzones. Between synchronisation points the fibers run in a seeded random
// order (HKEMU_SEED, default 1; 0 = thread index order), so reading another thread's shared
// write without a barrier sees the poison in some schedules.
//
// The launch syntax k<<<grid, block, smem, stream>>>(args) and `__shared__` declarations are not
// C++: build.py rewrites them (and nothing else) into HKEMU_LAUNCH / HKEMU_SHARED below, keeping
// line numbers, before g++ sees a .cu file. Everything else of the CUDA sources compiles as is.
#pragma once

#ifndef __CUDACC__
#define __CUDACC__ 1  // nvcc defines it for host and device passes; csrc/ tests it.
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Qualifiers and attributes.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __shared__ HKEMU_error_shared_declaration_not_rewritten_by_build_py
#define __constant__ HKEMU_error_constant_memory_is_not_emulated

// ---------------------------------------------------------------------------------------------
// Vector types (CUDA's alignments) and dim3.
struct __align__(16) uint4 { unsigned int x, y, z, w; };
struct __align__(8) uint2 { unsigned int x, y; };
struct uint3 { unsigned int x, y, z; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) float2 { float x, y; };

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Device math and memory intrinsics.
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned int>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

// CUDA's min / max overloads for integers and floats (mixed arguments: their common type).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  return T(b) < T(a) ? T(b) : T(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  return T(a) < T(b) ? T(b) : T(a);
}

// Cache-hinted loads and stores: plain accesses on the host (ASan checks them).
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldlu(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}

inline void __threadfence() {}
inline void __threadfence_block() {}

// Atomics: fibers never preempt each other, so a plain read-modify-write is atomic. The value
// is not deduced (atomicAdd(&unsigned_counter, 1) converts, as CUDA's overloads do).
namespace hkemu {
template <typename T>
struct Same {
  using type = T;
};
}  // namespace hkemu
template <typename T>
inline T atomicAdd(T* p, typename hkemu::Same<T>::type v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, typename hkemu::Same<T>::type v) {
  const T old = *p;
  if (old < v) *p = v;
  return old;
}
template <typename T>
inline T atomicMin(T* p, typename hkemu::Same<T>::type v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, typename hkemu::Same<T>::type v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, typename hkemu::Same<T>::type compare, typename hkemu::Same<T>::type v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---------------------------------------------------------------------------------------------
// The emulator: thread state, synchronisation, launches.
namespace hkemu {

// Where a thread waits (file:line of the call, for error messages).
struct Site {
  const char* file;
  int line;
};

// Kinds of warp collectives.
enum class Coll : int { kShflIdx, kShflXor, kShflDown, kShflUp, kBallot, kAny, kAll, kSyncWarp };

// The per-thread state kernels read through threadIdx / blockIdx / blockDim / gridDim.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// State of the running thread; reports an error when called outside a kernel.
ThreadState& this_thread();

void syncthreads(Site site);
// Joins the warp collective `kind` with the lanes in `mask`; returns this lane's result.
uint64_t warp_collective(Coll kind, unsigned mask, uint64_t value, int arg, int width, Site site);

// Memory of the __shared__ variable whose slot is `slot`, for the running block.
struct SharedSlot {
  uint64_t block_serial = 0;
  void* ptr = nullptr;
};
void* shared_get(SharedSlot& slot, size_t bytes, size_t align, const char* name, Site site);

// Prints "hkemu: <context>: <message>" and exits with status 86.
[[noreturn]] void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// The emulated devices (index 0 .. kMaxDevices - 1).
constexpr int kMaxDevices = 8;
struct DeviceProps {
  int sm_count = 132;          // multiprocessors (an H100 SXM)
  int blocks_per_sm = 0;       // occupancy reported for every kernel; 0 = 2048 / block threads
  int max_threads_per_block = 1024;
  size_t max_static_shared = 48 * 1024;
};
DeviceProps& device_props(int device);
int current_device();
void set_current_device(int device);
// The error the next cudaGetLastError returns (and clears).
int& last_error();

// A launch of one kernel: its name, where it was launched, and the runner of one thread.
struct LaunchInfo {
  const char* kernel;  // e.g. "hk::{anonymous}::decode_split_kernel<__half, 128, 4>"
  Site site;
  dim3 grid, block;
  size_t dynamic_smem;
};
using ThreadBody = void (*)(void* ctx);
// Validates the configuration (a bad one sets last_error, as CUDA does) and runs every block.
void run_launch(const LaunchInfo& info, ThreadBody body, void* ctx);

// Launch statistics, printed by the driver: launches and blocks per kernel name.
void print_launch_stats(std::FILE* out);
void reset_launch_stats();

template <typename... P, typename Tuple, size_t... I>
void call_kernel(void (*f)(P...), Tuple& args, std::index_sequence<I...>) {
  f(std::get<I>(args)...);  // by value, as every CUDA thread gets its own copy of the arguments
}

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten into
// `HKEMU_LAUNCH(kernel, grid, block, smem, stream)(args...)`.
template <auto F>
struct Launcher {
  LaunchInfo info;

  template <typename... P, typename... A>
  static void run(void (*f)(P...), const LaunchInfo& info, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong argument count");
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    struct Ctx {
      void (*f)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{f, &params};
    run_launch(info, [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      call_kernel(x->f, *x->params, std::index_sequence_for<P...>{});
    }, &ctx);
  }

  template <typename... A>
  void operator()(A&&... args) const {
    run(F, info, std::forward<A>(args)...);
  }
};

const char* intern_kernel_name(const char* pretty_function);

template <auto F, typename Stream = void*>
Launcher<F> launch(dim3 grid, dim3 block, size_t smem = 0, Stream = nullptr,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return {LaunchInfo{intern_kernel_name(__PRETTY_FUNCTION__), {file, line}, grid, block, smem}};
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles of values wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace hkemu

#define HKEMU_LAUNCH(kernel, ...) ::hkemu::launch<kernel>(__VA_ARGS__)
// `__shared__ T name[N][M];` is rewritten into `HKEMU_SHARED(16, T[N][M], name);`.
#define HKEMU_SHARED(align, type, name)                                                        \
  static ::hkemu::SharedSlot hkemu_slot_##name;                                               \
  type& name = *static_cast<type*>(::hkemu::shared_get(                                       \
      hkemu_slot_##name, sizeof(type), (align) > alignof(type) ? (align) : alignof(type), #name, \
      {__FILE__, __LINE__}))

#define threadIdx (::hkemu::this_thread().thread_idx)
#define blockIdx (::hkemu::this_thread().block_idx)
#define blockDim (::hkemu::this_thread().block_dim)
#define gridDim (::hkemu::this_thread().grid_dim)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::hkemu::syncthreads({file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::hkemu::warp_collective(::hkemu::Coll::kSyncWarp, mask, 0, 0, warpSize, {file, line});
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::hkemu::from_bits<T>(::hkemu::warp_collective(
      ::hkemu::Coll::kShflIdx, mask, ::hkemu::to_bits(var), src_lane, width, {file, line}));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::hkemu::from_bits<T>(::hkemu::warp_collective(
      ::hkemu::Coll::kShflXor, mask, ::hkemu::to_bits(var), lane_mask, width, {file, line}));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::hkemu::from_bits<T>(::hkemu::warp_collective(
      ::hkemu::Coll::kShflDown, mask, ::hkemu::to_bits(var), int(delta), width, {file, line}));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::hkemu::from_bits<T>(::hkemu::warp_collective(
      ::hkemu::Coll::kShflUp, mask, ::hkemu::to_bits(var), int(delta), width, {file, line}));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return unsigned(::hkemu::warp_collective(::hkemu::Coll::kBallot, mask, pred != 0, 0, warpSize,
                                           {file, line}));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(::hkemu::warp_collective(::hkemu::Coll::kAny, mask, pred != 0, 0, warpSize,
                                      {file, line}));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(::hkemu::warp_collective(::hkemu::Coll::kAll, mask, pred != 0, 0, warpSize,
                                      {file, line}));
}
