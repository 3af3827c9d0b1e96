// CUDA decode attention: one query per sequence over a [B, Lmax, Hkv, D] cache, split-KV.
//
// Kernel 1 (decode_split_kernel): one block of 128 threads per (split, kv head x head chunk,
// row). The block holds G query heads of a GQA group (G in 1, 2, 4: the largest dividing the
// group; larger groups are split into chunks of G, whose blocks run side by side and share K/V
// through L2) in registers, so every K/V row it loads serves all G heads. G = 8 in one block
// would need ~250 registers per thread and half the occupancy for the same traffic. A key row is read by
// D / VEC threads with 16-byte loads (VEC = 8 halves or 4 floats); the 128 threads cover 128 /
// (D / VEC) key rows at a time and each thread keeps kKeysPerThread rows in flight. Scores are
// reduced across the row's threads with warp shuffles; each thread row keeps an online softmax
// (in log2 units: q is pre-scaled by scale * log2(e)); the rows are combined in shared memory.
// A row's keys are its shared prefix (if any) followed by its own cache_lens[b] slots: one
// virtual sequence, cut into num_splits tile-aligned ranges (decode_plan.h), so prefix keys are
// just the first splits' work (a cascade without a separate pass).
//
// Kernel 2 (decode_merge_kernel, only when num_splits > 1): merges the splits' normalised
// partial outputs by log-sum-exp.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "cuda_utils.cuh"
#include "decode_plan.h"

namespace hk {
namespace {

constexpr int kThreads = 128;

template <typename T, int D, int G>
struct DecodeTraits {
  static constexpr int kVec = 16 / int(sizeof(T));    // elements per 16-byte load
  static constexpr int kTpr = D / kVec;               // threads per key row
  static constexpr int kRows = kThreads / kTpr;       // key rows loaded at once
  static constexpr int kKeysPerThread = 4;
  static constexpr int kTile = kRows * kKeysPerThread;
  static_assert(D % kVec == 0 && kThreads % kTpr == 0 && kTpr <= 32, "bad decode tiling");
};

__device__ __forceinline__ uint4 load_stream(const void* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));  // read once: evict first
}
__device__ __forceinline__ uint4 load_shared(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));  // the prefix is read by every row
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(const DecodeArgs a, const int group, const int chunks_per_kv) {
  using Tr = DecodeTraits<T, D, G>;
  constexpr int kVec = Tr::kVec, kTpr = Tr::kTpr, kRows = Tr::kRows;
  constexpr int kNk = Tr::kKeysPerThread, kTile = Tr::kTile;
  const int tx = threadIdx.x % kTpr, ty = threadIdx.x / kTpr;
  const int split = blockIdx.x;
  const int64_t b = blockIdx.z;
  const int64_t kvh = blockIdx.y / chunks_per_kv;
  const int64_t h0 = kvh * group + int64_t(blockIdx.y % chunks_per_kv) * G;

  const int64_t len = min(max(int64_t(a.cache_lens[b]), int64_t(0)), a.Lmax);
  const int64_t P = a.prefix_len;
  const KeyRange r = split_range(P + len, a.num_splits, kTile, split);

  float q[G][kVec];
  const float qscale = a.scale * kLog2e;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qp = static_cast<const T*>(a.q.data) + b * a.q.stride[0] +
                  (h0 + g) * a.q.stride[1] + tx * kVec;
    unpack16<T>(*reinterpret_cast<const uint4*>(qp), q[g]);
#pragma unroll
    for (int e = 0; e < kVec; ++e) q[g][e] *= qscale;
  }

  float m[G], l[G], acc[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  }

  const T* kc = static_cast<const T*>(a.k_cache.data) + b * a.k_cache.stride[0] +
                kvh * a.k_cache.stride[2] + tx * kVec;
  const T* vc = static_cast<const T*>(a.v_cache.data) + b * a.v_cache.stride[0] +
                kvh * a.v_cache.stride[2] + tx * kVec;
  const T* kp = static_cast<const T*>(a.k_prefix.data) + kvh * a.k_prefix.stride[1] + tx * kVec;
  const T* vp = static_cast<const T*>(a.v_prefix.data) + kvh * a.v_prefix.stride[1] + tx * kVec;

  for (int64_t base = r.begin; base < r.end; base += kTile) {
    uint4 kr[kNk], vr[kNk];
#pragma unroll
    for (int i = 0; i < kNk; ++i) {
      const int64_t j = base + i * kRows + ty;
      if (j >= r.end) {
        kr[i] = vr[i] = make_uint4(0u, 0u, 0u, 0u);
      } else if (j < P) {
        kr[i] = load_shared(kp + j * a.k_prefix.stride[0]);
        vr[i] = load_shared(vp + j * a.v_prefix.stride[0]);
      } else {
        kr[i] = load_stream(kc + (j - P) * a.k_cache.stride[1]);
        vr[i] = load_stream(vc + (j - P) * a.v_cache.stride[1]);
      }
    }

    float s[G][kNk];
#pragma unroll
    for (int i = 0; i < kNk; ++i) {
      float kf[kVec];
      unpack16<T>(kr[i], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(q[g][e], kf[e], dot);
        s[g][i] = dot;
      }
    }
#pragma unroll
    for (int off = kTpr / 2; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < kNk; ++i) s[g][i] += __shfl_xor_sync(0xffffffffu, s[g][i], off);

#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mt = m[g];
#pragma unroll
      for (int i = 0; i < kNk; ++i) {
        if (base + i * kRows + ty >= r.end) s[g][i] = -INFINITY;
        mt = fmaxf(mt, s[g][i]);
      }
      // mt == -inf: this thread row has seen no finite score yet (its l and acc are 0, or NaN
      // after NaN scores, which fmaxf skips). Subtracting 0 instead keeps masked keys at 0 and
      // NaN scores NaN, as in the CPU path and the reference.
      const float alpha = mt == -INFINITY ? 0.f : exp2f(m[g] - mt);
      const float mt_safe = mt == -INFINITY ? 0.f : mt;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int i = 0; i < kNk; ++i) {
        s[g][i] = exp2f(s[g][i] - mt_safe);
        l[g] += s[g][i];
      }
      m[g] = mt;
    }
#pragma unroll
    for (int i = 0; i < kNk; ++i) {
      float vf[kVec];
      unpack16<T>(vr[i], vf);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(s[g][i], vf[e], acc[g][e]);
    }
  }

  // Combine the kRows thread rows (each saw a disjoint subset of the keys).
  __shared__ float sm_m[kRows][G], sm_l[kRows][G];
  __shared__ __align__(16) float sm_acc[kRows][G][D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (tx == 0) {
      sm_m[ty][g] = m[g];
      sm_l[ty][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) sm_acc[ty][g][tx * kVec + e] = acc[g][e];
  }
  __syncthreads();

  const int S = a.num_splits;
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int row = 0; row < kRows; ++row) M = fmaxf(M, sm_m[row][g]);
    const float M_safe = M == -INFINITY ? 0.f : M;
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int row = 0; row < kRows; ++row) {
      const float w = exp2f(sm_m[row][g] - M_safe);  // 0 for rows that saw no finite score
      L = fmaf(w, sm_l[row][g], L);                  // 0 * NaN: NaN scores stay NaN
      O = fmaf(w, sm_acc[row][g][d], O);
    }
    const bool empty = L == 0.f;  // no key in this split (NaN is not empty, as on the CPU)
    const float o = empty ? 0.f : O / L;
    const float lse2 = empty ? -INFINITY : M + log2f(L);
    const int64_t hq = h0 + g;
    if (S == 1) {
      T* out = static_cast<T*>(a.out.data) + b * a.out.stride[0] + hq * a.out.stride[1];
      out[d * a.out.stride[2]] = from_f32<T>(o);
      if (d == 0) a.lse[b * a.lse_stride[0] + hq * a.lse_stride[1]] = lse2 * kLn2;
    } else {
      const int64_t bh = b * a.Hq + hq;
      a.workspace[(bh * S + split) * D + d] = o;
      if (d == 0) a.workspace[a.B * a.Hq * S * D + bh * S + split] = lse2;
    }
  }
}

// One block of D threads per (row, query head): thread d merges element d over the splits.
template <typename T>
__global__ void decode_merge_kernel(const DecodeArgs a) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.Hq, hq = bh % a.Hq;
  const int d = threadIdx.x;
  const int S = a.num_splits;
  const float* part_o = a.workspace + bh * S * a.D + d;
  const float* part_lse = a.workspace + a.B * a.Hq * S * a.D + bh * S;
  float lse2;
  const float o = merge_partials(S, part_lse, 1, part_o, a.D, &lse2);
  T* out = static_cast<T*>(a.out.data) + b * a.out.stride[0] + hq * a.out.stride[1];
  out[d * a.out.stride[2]] = from_f32<T>(o);
  if (d == 0) a.lse[b * a.lse_stride[0] + hq * a.lse_stride[1]] = lse2 * kLn2;
}

// Query heads per block: the largest of 4, 2, 1 that divides the GQA group.
int heads_per_block(int64_t group) {
  return group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
}

int sm_count(int device) {
  static std::atomic<int> cache[64];
  return cached_per_device(cache, device, [device] {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      n = 1;
    }
    return std::max(n, 1);
  });
}

template <typename T, int D, int G>
int blocks_per_sm(int device) {
  static std::atomic<int> cache[64];
  return cached_per_device(cache, device, [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_split_kernel<T, D, G>,
                                                      kThreads, 0) != cudaSuccess) {
      cudaGetLastError();
      n = 1;
    }
    return std::max(n, 1);
  });
}

template <typename T_, int D_, int G_>
struct Kernel {
  using T = T_;
  static constexpr int D = D_, G = G_;
};

// Calls f(Kernel<T, D, G>{}) for the kernel instantiation of these arguments.
template <typename F>
auto dispatch(int dtype, int64_t D, int G, F&& f) {
  auto by_g = [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    switch (G) {
      case 4: return f(Kernel<T, kD, 4>{});
      case 2: return f(Kernel<T, kD, 2>{});
      default: return f(Kernel<T, kD, 1>{});
    }
  };
  auto by_d = [&](auto t) {
    if (D == 128) return by_g(t, std::integral_constant<int, 128>{});
    HK_CHECK(D == 64, "decode_attention: head_dim ", D,
             " is not supported by the CUDA kernel (64, 128)");
    return by_g(t, std::integral_constant<int, 64>{});
  };
  switch (dtype) {
    case kFloat16: return by_d(__half{});
    case kBFloat16: return by_d(__nv_bfloat16{});
    default:
      HK_CHECK(dtype == kFloat32, "decode_attention: unsupported dtype code ", dtype);
      return by_d(float{});
  }
}

}  // namespace

int decode_num_splits_cuda(int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t Lmax,
                           int64_t prefix_len, int dtype, int forced, int device) {
  if (forced > 0) return forced;
  DeviceGuard guard(device, "decode_attention");
  const int G = heads_per_block(Hq / Hkv);
  const int64_t work = B * Hkv * (Hq / Hkv / G);
  const int per_sm = dispatch(dtype, D, G, [&](auto k) {
    using K = decltype(k);
    return blocks_per_sm<typename K::T, K::D, K::G>(device);
  });
  return choose_num_splits(work, int64_t(sm_count(device)) * per_sm, prefix_len + Lmax);
}

void decode_attention_cuda(const DecodeArgs& a, int device, uintptr_t stream_handle) {
  DeviceGuard guard(device, "decode_attention");
  const int64_t group = a.Hq / a.Hkv;
  const int G = heads_per_block(group);
  const int64_t chunks = group / G;
  HK_CHECK(a.Hkv * chunks <= 65535 && a.B <= 65535, "decode_attention: B = ", a.B,
           " and Hkv x head chunks = ", a.Hkv * chunks, " must each be <= 65535");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(unsigned(a.num_splits), unsigned(a.Hkv * chunks), unsigned(a.B));
  dispatch(a.dtype, a.D, G, [&](auto k) {
    using K = decltype(k);
    using T = typename K::T;
    decode_split_kernel<T, K::D, K::G><<<grid, kThreads, 0, stream>>>(a, int(group), int(chunks));
    check_launch("decode_attention (split kernel)");
    if (a.num_splits > 1) {
      decode_merge_kernel<T><<<unsigned(a.B * a.Hq), unsigned(K::D), 0, stream>>>(a);
      check_launch("decode_attention (merge kernel)");
    }
    return 0;
  });
}

}  // namespace hk
