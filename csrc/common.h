// Shared definitions of the hybridkernels._C extension: dtype codes, argument checks,
// and the plain-old-data descriptions of tensors that the bindings hand to the kernels.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

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

#ifdef __CUDACC__
#define HK_INDEX_FN __host__ __device__ __forceinline__
#else
#define HK_INDEX_FN inline
#endif

// Overflow-safe index checks, shared by the host checks and the kernels' own guards. Each is
// written so that no intermediate value can overflow int64 for any input.

// True when slots pos .. pos + T - 1 lie in [0, Lmax) (needs 0 <= T <= Lmax, checked first).
HK_INDEX_FN bool slots_fit(int64_t pos, int64_t T, int64_t Lmax) {
  return pos >= 0 && pos <= Lmax - T;
}

// True when row `start + offset` of a table with `rows` rows exists (0 <= offset, checked).
HK_INDEX_FN bool row_in_table(int64_t start, int64_t offset, int64_t rows) {
  return start >= 0 && offset >= 0 && start < rows && offset < rows - start;
}

// *out = a * b, or false when the product of these non-negative numbers overflows int64.
inline bool mul_fits(int64_t a, int64_t b, int64_t* out) {
  return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

// *out = a + b, or false when the sum of these non-negative numbers overflows int64.
inline bool add_fits(int64_t a, int64_t b, int64_t* out) {
  return a >= 0 && b >= 0 && !__builtin_add_overflow(a, b, out);
}

// Largest byte offset (+ one element) a view of `sizes` (all >= 1) with non-negative `strides`
// reaches, or -1 when computing it (or any address inside the view) would overflow int64.
inline int64_t view_extent_bytes(const int64_t* sizes, const int64_t* strides, int n,
                                 int64_t elem_size) {
  int64_t last = 0;
  for (int i = 0; i < n; ++i) {
    int64_t term = 0;
    if (sizes[i] < 1 || !mul_fits(sizes[i] - 1, strides[i], &term) || !add_fits(last, term, &last))
      return -1;
  }
  int64_t bytes = 0;
  if (!add_fits(last, 1, &last) || !mul_fits(last, elem_size, &bytes)) return -1;
  return bytes;
}

// A 4-d strided view: [d0, d1, d2, d3] with strides in elements.
struct View4 {
  void* data;
  int64_t stride[4];
};

// Arguments of kv_append after validation. Caches are [B, Lmax, H, D], new rows [B, T, H, D];
// row b's tokens go to slots positions[b] .. positions[b] + T - 1.
//
// Optional RoPE (rotate-half, the HF Llama convention): when rope_cos is set, the key of row b,
// token t is rotated by the table row p = rope_positions[b * rope_pos_stride[0] + t *
// rope_pos_stride[1]] + t * rope_pos_step before it is written (rope_pos_step is 1 for start
// positions [B], 0 for per-token positions [B, T]); with half = D / 2 and i < half, in float32:
//   out[i]        = k[i] * cos[p, i] - k[i + half] * sin[p, i]
//   out[i + half] = k[i + half] * cos[p, i] + k[i] * sin[p, i]
// cos / sin are float32 tables with rope_rows rows; only their first `half` columns are read.
struct KvAppendArgs {
  View4 k_cache, v_cache, k_new, v_new;
  const void* positions;
  int positions_dtype;  // kInt32 or kInt64
  int64_t B, T, Lmax, H, D;
  int64_t elem_size;
  int dtype;  // float code of the caches and new rows
  const float* rope_cos = nullptr;
  const float* rope_sin = nullptr;
  int64_t rope_rows = 0, rope_row_stride = 0;
  const void* rope_positions = nullptr;
  int rope_positions_dtype = kInt64;
  int64_t rope_pos_stride[2] = {0, 0};
  int64_t rope_pos_step = 1;
};

// A 3-d strided view ([Lp, H, D] prefixes, [B, H, D] queries and outputs), strides in elements.
struct View3 {
  void* data;
  int64_t stride[3];
};

// Arguments of decode_attention after validation. q [B, Hq, D]; caches [B, Lmax, Hkv, D]; row b
// attends the prefix keys 0 .. prefix_len - 1 (shared [Lp, Hkv, D] tensors) and then its own
// slots 0 .. cache_lens[b] - 1; out [B, Hq, D] in q's dtype, lse [B, Hq] float32 (natural log).
// Keys form one virtual sequence per row (prefix first) that is cut into num_splits ranges;
// with more than one split, partial results go to the float32 workspace and a second kernel
// merges them by log-sum-exp.
struct DecodeArgs {
  View3 q;
  View4 k_cache, v_cache;
  View3 k_prefix, v_prefix;  // data == nullptr when prefix_len == 0
  View3 out;
  float* lse;                // [B, Hq], strides lse_stride
  int64_t lse_stride[2];
  const int32_t* cache_lens;
  float* workspace;          // num_splits > 1: o [B, Hq, S, D] then lse [B, Hq, S] (log2 units)
  int64_t B, Hq, Hkv, D, Lmax, prefix_len;
  int dtype;
  float scale;
  int num_splits;
};

// Number of float32 values of decode workspace a plan with `num_splits` needs.
inline int64_t decode_workspace_floats(int64_t B, int64_t Hq, int64_t D, int num_splits) {
  return num_splits > 1 ? B * Hq * int64_t(num_splits) * (D + 1) : 0;
}

// Arguments of the fused unmask scoring pass (unmask_scores_cpu). hidden [R, d] and lm_head
// [V, d] share `dtype` (float codes); banned: sorted unique ids in [0, V) whose logit is -inf.
// Per row r of logits = hidden @ lm_head.T it writes argmax[r] (first index of the maximum, or
// of the first NaN: torch.argmax's rule), max_logit[r], second_logit[r] (the largest logit at
// any other id; NaN for a NaN row) and sum_exp[r] = sum_v exp(logit - max) (float64 sum; NaN
// when the max is NaN or +-inf).
constexpr int64_t kUnmaskPanel = 48;  // vocabulary rows per packed panel: 3 vectors of 16 lanes
struct UnmaskScoreArgs {
  const void* hidden;
  int64_t hidden_stride[2];
  const void* lm_head;
  int64_t lm_head_stride[2];
  int64_t R, V, d;
  int dtype;
  std::vector<int64_t> banned;
  // Optional: lm_head as float32 packed k-major in panels of kUnmaskPanel vocabulary rows,
  // packed[(p * d + k) * kUnmaskPanel + c] = lm_head[p * kUnmaskPanel + c, k] (zero past V),
  // ceil(V / kUnmaskPanel) panels. With it, lm_head is not read and each logit sums its d
  // products in chunks of k_chunk FMAs (from k = 0), the chunk sums added in k order.
  const float* packed = nullptr;
  int64_t k_chunk = 0;
  int64_t* argmax;
  float* max_logit;
  float* second_logit;
  double* sum_exp;
};

// The elementwise parts of a decoder layer (decoder_cpu.cpp), float32 host memory, strides in
// elements. rms_norm: with `residual`, first x[r] += residual[r] in place (the residual stream),
// then out[r] = weight * (x[r] / sqrt(mean(x[r]^2) + eps)); `out` may be `x`. With groups > 1
// each row holds `groups` vectors of `dim` at `group_stride` (x) / `out_group_stride` (out),
// each normalised on its own (Qwen3's per-head q/k norms); no residual then.
struct RmsNormArgs {
  float* x;
  int64_t x_stride;
  const float* residual;  // or nullptr
  int64_t residual_stride;
  const float* weight;  // [dim]
  float* out;
  int64_t out_stride;
  int64_t rows, dim;
  float eps;
  int64_t groups, group_stride, out_group_stride;
};
// In place, rotate-half RoPE of `heads` heads of `head_dim` per row: x * cos + roll(x, D/2) *
// sin with the tables' row positions[r] (cos = cat(c, c), sin = cat(-s, s), [P, D] rows of
// `table_stride`).
struct RotaryArgs {
  float* x;
  int64_t rows, heads, head_dim, row_stride, head_stride;
  const int64_t* positions;  // [rows], each in [0, P)
  const float* cos;
  const float* sin;
  int64_t table_stride;
};
// out[r] = silu(gate[r]) * up[r] over n columns (SwiGLU), gate/up rows of `in_stride`.
struct SiluMulArgs {
  const float* gate;
  const float* up;
  int64_t in_stride;
  float* out;
  int64_t out_stride;
  int64_t rows, n;
};

void unmask_scores_cpu(const UnmaskScoreArgs& a);
// kUnmaskPanel where the packed path is faster on this CPU (AVX2 / AVX-512), else 0.
int64_t unmask_packed_panel();
void rms_norm_cpu(const RmsNormArgs& a);
void rotary_cpu(const RotaryArgs& a);
void silu_mul_cpu(const SiluMulArgs& a);
void kv_append_cpu(const KvAppendArgs& a);
// num_splits == 0: one pass per row (auto); > 0: that many splits merged like the CUDA path.
void decode_attention_cpu(DecodeArgs a);
#ifdef HK_WITH_CUDA
// Launches on `stream`; throws std::runtime_error with the CUDA error string on failure.
void kv_append_cuda(const KvAppendArgs& a, int device, uintptr_t stream);
// Split count the CUDA path uses for these sizes on `device` (forced > 0 is returned as is).
int decode_num_splits_cuda(int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t Lmax,
                           int64_t prefix_len, int dtype, int forced, int device);
void decode_attention_cuda(const DecodeArgs& a, int device, uintptr_t stream);
#endif

}  // namespace hk
