// C++ scoring pass of the fused unmask_step for host memory: hidden [R, d] against the LM head
// [V, d] without materialising the [R, V] logits. The LM head streams through the cache once in
// tiles of kTileV vocabulary rows; every tile is dotted with all R hidden rows (float32
// multiply-adds, 16 lanes per row, the lanes summed in a fixed order), and each row folds the
// tile into its running partials: first-index argmax, max and second-largest logit, and the sum
// of exp(logit - max) in float64 (the partials the Triton kernel merges across programs).
// With a packed copy of the LM head (UnmaskScoreArgs::packed: float32, k-major in panels of 48
// vocabulary rows, made once per weight by ops/_unmask_cpu.py) a GEMM microkernel computes the
// tile instead: vocabulary along the lanes, 8 hidden rows x 48 ids of accumulators, products
// summed in chunks of k_chunk (a tighter rounding bound than one chain of d FMAs).
//
// The rounding differs from torch's matmul + softmax; hybridkernels/ops/_unmask_cpu.py decides,
// from the margins these partials give, whether the commit is certain to be the reference's.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "float_convert.h"

namespace hk {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HK_UNMASK_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HK_UNMASK_CLONES
#endif

constexpr int kLanes = 16;  // one AVX-512 register, two AVX2 ones
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Lanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

// By reference: a vector argument or return value would change the ABI between the clones.
inline void load(Vec& v, const float* p) { std::memcpy(&v, p, sizeof(Vec)); }

inline float lane_sum(const Vec& v) {
  float s[kLanes];
  std::memcpy(s, &v, sizeof(Vec));
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}

// exp(x) of 16 lanes x <= 0 (x = logit - running max): Cody-Waite reduction to 2^n exp(r),
// |r| <= ln2/2, and a degree-6 polynomial (relative error < 2e-7); 0 below -87 (and for -inf),
// NaN stays NaN. Vector-extension arithmetic only, so every clone vectorises it.
inline void exp_nonpos(Vec& out, const Vec& x) {
  const Vec lo = Vec{} - 87.0f;
  const Vec t = x < lo ? lo : x;
  const Vec magic = Vec{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to integer
  const Vec n = (t * 1.44269504088896341f + magic) - magic;
  const Vec r = (t - n * 0.693359375f) + n * 2.12194440e-4f;
  Vec p = Vec{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const Lanes bits = (__builtin_convertvector(n, Lanes) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(Vec));
  const Vec e = p * scale;
  const Vec zero_below = x < lo ? Vec{} : e;
  out = x != x ? x : zero_below;
}

struct RowState {
  float max = -std::numeric_limits<float>::infinity();  // NaN once a NaN logit was seen
  float second = -std::numeric_limits<float>::infinity();
  int64_t arg = -1;
  double sum = 0.0;  // of exp(logit - max); only meaningful while max is finite
};

#if defined(__clang__)
#define HK_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define HK_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, Lanes{__VA_ARGS__})
#endif

// The 16 lane sums of x[0 .. 16) in one vector: lane j holds the sum of x[bit_reverse4(j)].
// 15 shuffle pairs and adds instead of 16 x 15 scalar adds.
inline void reduce16(Vec& out, const Vec* x) {
  Vec y[8], z[4], u[2];
  for (int i = 0; i < 8; ++i)
    y[i] = HK_SHUFFLE2(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           HK_SHUFFLE2(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    z[i] = HK_SHUFFLE2(y[2 * i], y[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           HK_SHUFFLE2(y[2 * i], y[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    u[i] = HK_SHUFFLE2(z[2 * i], z[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           HK_SHUFFLE2(z[2 * i], z[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  out = HK_SHUFFLE2(u[0], u[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
        HK_SHUFFLE2(u[0], u[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

constexpr int kBitReverse4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// Logits of RB hidden rows (h, row stride hs) against n LM-head rows (w, row stride ws, float32):
// out[r * out_stride + j]. kLanes / RB LM-head rows at a time, so RB x that = 16 accumulators
// (one reduction) and each loaded vector feeds several FMAs.
// While it computes, it prefetches pf_lines cache lines from pf (the next tile), spread over its
// iterations, so the next tile's DRAM traffic overlaps this tile's arithmetic.
template <int RB>
HK_UNMASK_CLONES void dot_block(const float* h, int64_t hs, const float* w, int64_t ws, int64_t n,
                                int64_t d, float* out, int64_t out_stride, const char* pf,
                                int64_t pf_lines) {
  constexpr int VB = kLanes / RB;
  const int64_t dv = d - d % kLanes;
  const int64_t groups = std::max<int64_t>(n / VB, 1);
  const int64_t pf_step = (pf_lines + groups - 1) / groups;
  int64_t j = 0;
  for (; j + VB <= n; j += VB) {
    for (int64_t i = 0; i < pf_step && pf_lines > 0; ++i, --pf_lines, pf += 64) __builtin_prefetch(pf, 0, 2);
    Vec acc[kLanes] = {};  // acc[r * VB + c]: hidden row r x LM-head row j + c
    for (int64_t k = 0; k < dv; k += kLanes) {
      Vec x[VB], hv;
      for (int c = 0; c < VB; ++c) load(x[c], w + (j + c) * ws + k);
      for (int r = 0; r < RB; ++r) {
        load(hv, h + r * hs + k);
        for (int c = 0; c < VB; ++c) acc[r * VB + c] += hv * x[c];
      }
    }
    // Fed in bit-reversed order, the reduction leaves acc[i]'s sum in lane i.
    Vec order[kLanes], sums;
    for (int i = 0; i < kLanes; ++i) order[i] = acc[kBitReverse4[i]];
    reduce16(sums, order);
    float s[kLanes];
    std::memcpy(s, &sums, sizeof(Vec));
    if (dv < d) {
      for (int r = 0; r < RB; ++r)
        for (int c = 0; c < VB; ++c)
          for (int64_t k = dv; k < d; ++k) s[r * VB + c] += h[r * hs + k] * w[(j + c) * ws + k];
    }
    for (int r = 0; r < RB; ++r) std::memcpy(out + r * out_stride + j, s + r * VB, VB * sizeof(float));
  }
  for (; j < n; ++j) {
    const float* w0 = w + j * ws;
    Vec acc[RB] = {};
    for (int64_t k = 0; k < dv; k += kLanes) {
      Vec x0, hv;
      load(x0, w0 + k);
      for (int r = 0; r < RB; ++r) {
        load(hv, h + r * hs + k);
        acc[r] += hv * x0;
      }
    }
    for (int r = 0; r < RB; ++r) {
      float t = lane_sum(acc[r]);
      for (int64_t k = dv; k < d; ++k) t += h[r * hs + k] * w0[k];
      out[r * out_stride + j] = t;
    }
  }
}

// Folds logits l[0 .. n) (vocabulary ids v0 ..) into one row's partials.
HK_UNMASK_CLONES
void fold_tile(RowState& st, const float* l, int64_t n, int64_t v0) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (std::isnan(st.max)) return;  // the row's first NaN is its argmax; nothing else matters
  const int64_t nv = n - n % kLanes;
  Vec mx = Vec{} + kNegInf;
  Lanes nan_seen = {};
  for (int64_t j = 0; j < nv; j += kLanes) {
    Vec x;
    load(x, l + j);
    mx = x > mx ? x : mx;
    nan_seen |= x != x;
  }
  float lanes[kLanes];
  std::memcpy(lanes, &mx, sizeof(Vec));
  float tmax = kNegInf;
  bool nan = false;
  for (int i = 0; i < kLanes; ++i) tmax = std::max(tmax, lanes[i]), nan |= nan_seen[i] != 0;
  for (int64_t j = nv; j < n; ++j) tmax = std::max(tmax, l[j]), nan |= std::isnan(l[j]);
  if (nan) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(l[j])) {
        st.max = l[j];
        st.arg = v0 + j;
        return;
      }
  }
  if (st.arg < 0 && tmax == kNegInf) {
    // Every logit so far is -inf (banned ids, or -inf scores): argmax is the first id.
    st.arg = v0;
    return;
  }
  if (tmax > st.max) {  // a new argmax in this tile: its first occurrence, the tile's runner-up
    int64_t at = 0;
    while (l[at] != tmax) ++at;
    float runner = kNegInf;
    for (int64_t j = 0; j < n; ++j)
      if (j != at) runner = std::max(runner, l[j]);
    if (std::isfinite(st.max)) st.sum *= std::exp(double(st.max) - double(tmax));
    st.second = std::max(st.max, runner);
    st.max = tmax;
    st.arg = v0 + at;
  } else {
    st.second = std::max(st.second, tmax);
  }
  if (!std::isfinite(st.max)) return;  // +inf: the softmax is NaN (decided at the end)
  // A tile holds at most 512 logits: 32 a lane, summed in float32, then the lanes in float64.
  const Vec m = Vec{} + st.max;
  Vec acc = {};
  for (int64_t j = 0; j < nv; j += kLanes) {
    Vec x, e;
    load(x, l + j);
    exp_nonpos(e, x - m);
    acc += e;
  }
  float sums[kLanes];
  std::memcpy(sums, &acc, sizeof(Vec));
  double total = 0;
  for (int i = 0; i < kLanes; ++i) total += sums[i];
  if (nv < n) {
    Vec x = Vec{} + kNegInf, e;
    std::memcpy(&x, l + nv, sizeof(float) * (n - nv));
    exp_nonpos(e, x - m);
    std::memcpy(sums, &e, sizeof(Vec));
    for (int64_t j = 0; j < n - nv; ++j) total += sums[j];
  }
  st.sum += total;
}

template <typename T>
void convert_rows(const T* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                  float* dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      dst[r * dst_stride + k] = to_float(src[r * row_stride + k * col_stride]);
}

// ---- the packed path: vocabulary along the lanes ----------------------------------------------
// A GEMM microkernel over the k-major packed LM head (UnmaskScoreArgs::packed): for each k, the
// panel's 48 weights are 48 / W vectors of W lanes, each hidden value h[r, k] is broadcast, and
// RB x (48 / W) accumulators take one FMA each, so no horizontal reduction is needed.

constexpr int kMaxRowBlock = 8;  // AVX-512: 8 x 3 accumulators, 24 of the 32 registers

// Logits of RB hidden rows against one panel, over k in [0, klen) of this call, in vectors of W
// lanes (16: AVX-512; 8: one AVX2 register, as GCC splits wider generic vectors through memory):
//   hp: the rows' hidden values k-major (hp[k * RB + r]), wp: the panel's k-major weights
//   (wp[k * 48 + c]), out[r * out_stride + c] (c < 48): the logits' running sums.
// Each chunk of `chunk` consecutive k starts a fresh product sum in registers (its first
// product rounded once, then FMAs), which is then added to out; with `store_first` the first
// chunk is stored instead (k = 0 of the logit). Prefetches pf_lines cache lines from pf,
// spread over the k loop.
template <int RB, int W>
HK_UNMASK_CLONES void panel_rows(const float* hp, const float* wp, int64_t klen, int64_t chunk,
                                 bool store_first, float* out, int64_t out_stride, const char* pf,
                                 int64_t pf_lines) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  // Unaligned and aliasing: loads and stores of whole registers (GCC's x86-64-v3 tuning turns a
  // memcpy into 16-byte halves, whose 32-byte reload misses store forwarding).
  typedef float VU __attribute__((vector_size(W * sizeof(float)), aligned(4), may_alias));
  constexpr int NV = kUnmaskPanel / W;
  static_assert(NV * W == kUnmaskPanel, "a panel is a whole number of vectors");
  const int64_t pf_step = (pf_lines + klen - 1) / klen;
  for (int64_t c0 = 0; c0 < klen; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, klen);
    V acc[RB][NV];
    {
      V x[NV];
      for (int c = 0; c < NV; ++c) x[c] = *reinterpret_cast<const VU*>(wp + c0 * kUnmaskPanel + c * W);
      for (int r = 0; r < RB; ++r) {
        const V hv = hp[c0 * RB + r] - V{};  // a broadcast (x - 0 is x, -0 too)
        for (int c = 0; c < NV; ++c) acc[r][c] = hv * x[c];
      }
    }
    for (int64_t k = c0 + 1; k < c1; ++k) {
      for (int64_t i = 0; i < pf_step && pf_lines > 0; ++i, --pf_lines, pf += 64)
        __builtin_prefetch(pf, 0, 2);
      V x[NV];
      for (int c = 0; c < NV; ++c) x[c] = *reinterpret_cast<const VU*>(wp + k * kUnmaskPanel + c * W);
      for (int r = 0; r < RB; ++r) {
        const V hv = hp[k * RB + r] - V{};
        for (int c = 0; c < NV; ++c) acc[r][c] += hv * x[c];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < NV; ++c) {
        VU* o = reinterpret_cast<VU*>(out + r * out_stride + c * W);
        *o = store_first && c0 == 0 ? acc[r][c] : *o + acc[r][c];
      }
  }
}

using PanelRowsFn = void (*)(const float*, const float*, int64_t, int64_t, bool, float*, int64_t,
                             const char*, int64_t);

// The microkernel for this CPU, by rows per block (1 .. max_rows): AVX-512 (x86-64-v4) takes up
// to 8 rows in 16 lanes; AVX2 up to 2 rows in 8 lanes (2 x 6 accumulators of its 16 registers);
// older x86-64 (SSE2) 1 row; other architectures 2 rows in 8 lanes.
struct PanelKernel {
  int max_rows;
  PanelRowsFn by_rows[kMaxRowBlock + 1];
};

const PanelKernel& panel_kernel() {
  static const PanelKernel k16 = {8,
                                  {nullptr, panel_rows<1, 16>, panel_rows<2, 16>, panel_rows<3, 16>,
                                   panel_rows<4, 16>, panel_rows<5, 16>, panel_rows<6, 16>,
                                   panel_rows<7, 16>, panel_rows<8, 16>}};
  static const PanelKernel k8 = {2, {nullptr, panel_rows<1, 8>, panel_rows<2, 8>}};
  static const PanelKernel k8_one = {1, {nullptr, panel_rows<1, 8>}};
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const PanelKernel& chosen = __builtin_cpu_supports("x86-64-v4")   ? k16
                                     : __builtin_cpu_supports("x86-64-v3") ? k8
                                                                           : k8_one;
  return chosen;
#else
  (void)k16, (void)k8_one;
  return k8;  // e.g. NEON's 32 registers: 2 x 6 accumulators of two
#endif
}

// Masks the banned ids of tile [v0, v0 + n) (logits[r * tile + j]) and folds it into the rows.
void fold_rows(std::vector<RowState>& rows, float* logits, int64_t tile, int64_t n, int64_t v0,
               const std::vector<int64_t>& banned, size_t& next_banned) {
  for (; next_banned < banned.size() && banned[next_banned] < v0 + n; ++next_banned)
    for (size_t r = 0; r < rows.size(); ++r)
      logits[r * tile + (banned[next_banned] - v0)] = -std::numeric_limits<float>::infinity();
  for (size_t r = 0; r < rows.size(); ++r) fold_tile(rows[r], logits + r * tile, n, v0);
}

void write_rows(const UnmaskScoreArgs& a, const std::vector<RowState>& rows) {
  for (int64_t r = 0; r < a.R; ++r) {
    const RowState& st = rows[r];
    a.argmax[r] = st.arg;
    a.max_logit[r] = st.max;
    a.second_logit[r] = std::isnan(st.max) ? st.max : st.second;
    a.sum_exp[r] = std::isfinite(st.max) ? st.sum : std::numeric_limits<double>::quiet_NaN();
  }
}

template <typename T>
void unmask_scores_packed(const UnmaskScoreArgs& a) {
  const int64_t R = a.R, V = a.V, d = a.d, chunk = a.k_chunk;
  // Row blocks of at most kernel.max_rows rows, as even as possible (17 rows: 6 + 6 + 5).
  const PanelKernel& kernel = panel_kernel();
  const int64_t nblocks = (R + kernel.max_rows - 1) / kernel.max_rows;
  std::vector<int64_t> block_start(nblocks + 1);
  for (int64_t b = 0; b <= nblocks; ++b) block_start[b] = R * b / nblocks;
  // The hidden rows as float32, each block k-major: hp[block_start[b] * d + k * rb + r].
  std::vector<float> hp(R * d);
  const T* hidden = static_cast<const T*>(a.hidden);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t r0 = block_start[b], rb = block_start[b + 1] - r0;
    for (int64_t r = 0; r < rb; ++r)
      for (int64_t k = 0; k < d; ++k)
        hp[r0 * d + k * rb + r] =
            to_float(hidden[(r0 + r) * a.hidden_stride[0] + k * a.hidden_stride[1]]);
  }
  // Tiles of up to 4 panels (192 logits, 192 KB at d = 256; measured 3-10% faster than 10
  // panels at d = 256, the same at 4096, the next tile prefetched closer ahead); for wide rows,
  // k blocks (multiples of the chunk) that keep a tile's slice of the LM head ~512 KB,
  // L2-resident while every row block reads it.
  const int64_t panels = (V + kUnmaskPanel - 1) / kUnmaskPanel;
  const int64_t tile_panels = std::min<int64_t>(4, panels);
  const int64_t tile = tile_panels * kUnmaskPanel;
  const int64_t kb_target = std::max<int64_t>(1, (512 << 10) / (tile * int64_t(sizeof(float))));
  const int64_t kblock = std::min(d, std::max<int64_t>(1, kb_target / chunk) * chunk);
  std::vector<float> logits(R * tile);
  std::vector<RowState> rows(R);
  size_t next_banned = 0;

  for (int64_t p0 = 0; p0 < panels; p0 += tile_panels) {
    const int64_t np = std::min(tile_panels, panels - p0);
    const int64_t v0 = p0 * kUnmaskPanel, n = std::min(np * kUnmaskPanel, V - v0);
    const float* w = a.packed + p0 * d * kUnmaskPanel;
    for (int64_t k0 = 0; k0 < d; k0 += kblock) {
      const int64_t klen = std::min(kblock, d - k0);
      // What the next (tile, k block) reads: klen' k of np' panels; panel p's part is prefetched
      // by the calls on panel p, a slice per row block.
      const bool same_tile = k0 + kblock < d;
      const int64_t pf_p0 = same_tile ? p0 : p0 + np, pf_k0 = same_tile ? k0 + kblock : 0;
      const int64_t pf_np = std::min(tile_panels, panels - pf_p0);
      const int64_t pf_klen = std::min(kblock, d - pf_k0);
      const int64_t lines = (pf_klen * kUnmaskPanel * int64_t(sizeof(float)) + 63) / 64;
      const int64_t slice = (lines + nblocks - 1) / nblocks;
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t r0 = block_start[b], rb = block_start[b + 1] - r0;
        const float* hb = hp.data() + r0 * d + k0 * rb;
        const int64_t done = std::min(lines, b * slice), mine = std::min(slice, lines - done);
        for (int64_t p = 0; p < np; ++p) {
          const char* pf = p < pf_np ? reinterpret_cast<const char*>(
                                           a.packed + ((pf_p0 + p) * d + pf_k0) * kUnmaskPanel) +
                                           done * 64
                                     : nullptr;
          kernel.by_rows[rb](hb, w + (p * d + k0) * kUnmaskPanel, klen, chunk, k0 == 0,
                         logits.data() + r0 * tile + p * kUnmaskPanel, tile, pf, pf ? mine : 0);
        }
      }
    }
    fold_rows(rows, logits.data(), tile, n, v0, a.banned, next_banned);
  }
  write_rows(a, rows);
}

// ---- the row-major path --------------------------------------------------------------------

template <typename T>
void unmask_scores_impl(const UnmaskScoreArgs& a) {
  const int64_t R = a.R, V = a.V, d = a.d;
  // The hidden rows as float32, contiguous.
  std::vector<float> h(R * d);
  convert_rows(static_cast<const T*>(a.hidden), R, d, a.hidden_stride[0], a.hidden_stride[1],
               h.data(), d);
  // Tiles of ~128 KB of float32 LM head (L2-resident while all row blocks read them).
  const int64_t tile = std::clamp<int64_t>(32768 / std::max<int64_t>(d, 1), 16, 512);
  const bool direct = std::is_same_v<T, float> && a.lm_head_stride[1] == 1;
  std::vector<float> wbuf(direct ? 0 : tile * d);
  std::vector<float> logits(R * tile);
  std::vector<RowState> rows(R);
  size_t next_banned = 0;  // banned ids are sorted and unique

  for (int64_t v0 = 0; v0 < V; v0 += tile) {
    const int64_t n = std::min(tile, V - v0);
    const float* w;
    int64_t ws;
    const T* src = static_cast<const T*>(a.lm_head) + v0 * a.lm_head_stride[0];
    if (direct) {
      w = reinterpret_cast<const float*>(src);
      ws = a.lm_head_stride[0];
    } else {
      convert_rows(src, n, d, a.lm_head_stride[0], a.lm_head_stride[1], wbuf.data(), d);
      w = wbuf.data();
      ws = d;
    }
    // The next tile (float32 rows in place only), a slice per row block: measured 32 -> 22 ms at
    // R = 16, V = 126,464, d = 256 (1 thread); at R = 1 it only costs.
    const int64_t next_n = std::min(tile, V - v0 - n);
    const bool prefetch = direct && next_n > 0 && ws == d && R >= 4;  // fewer rows: DRAM-bound anyway
    const char* pf = prefetch ? reinterpret_cast<const char*>(w + n * ws) : nullptr;
    const int64_t lines = prefetch ? (next_n * d * int64_t(sizeof(float)) + 63) / 64 : 0;
    const int64_t blocks = R / 4 + (R % 4 >= 2) + (R % 2);
    const int64_t slice = (lines + blocks - 1) / blocks;
    int64_t done = 0;
    // Rows in blocks of 4 (4 x 4 LM-head rows: the fastest register block measured, ahead of
    // 8 x 2 and 2 x 8), then 2 and 1 for the rest: no padding rows.
    for (int64_t r0 = 0; r0 < R;) {
      const float* hr = h.data() + r0 * d;
      float* lr = logits.data() + r0 * tile;
      const int64_t left = R - r0;
      const int rb = left >= 4 ? 4 : left >= 2 ? 2 : 1;
      const int64_t mine = std::max<int64_t>(std::min(slice, lines - done), 0);
      const char* pf_mine = pf ? pf + done * 64 : nullptr;
      done += mine;
      switch (rb) {
        case 4: dot_block<4>(hr, d, w, ws, n, d, lr, tile, pf_mine, mine); break;
        case 2: dot_block<2>(hr, d, w, ws, n, d, lr, tile, pf_mine, mine); break;
        default: dot_block<1>(hr, d, w, ws, n, d, lr, tile, pf_mine, mine); break;
      }
      r0 += rb;
    }
    fold_rows(rows, logits.data(), tile, n, v0, a.banned, next_banned);
  }
  write_rows(a, rows);
}

}  // namespace

int64_t unmask_packed_panel() {
  // Measured faster than the row-major path with AVX2 or AVX-512 only; elsewhere (SSE2 builds:
  // 2x slower) the LM head is not packed.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool fast = __builtin_cpu_supports("x86-64-v3");
  return fast ? kUnmaskPanel : 0;
#else
  return 0;
#endif
}

void unmask_scores_cpu(const UnmaskScoreArgs& a) {
  const bool packed = a.packed != nullptr;
  switch (a.dtype) {
    case kFloat32: packed ? unmask_scores_packed<float>(a) : unmask_scores_impl<float>(a); break;
    case kFloat16: packed ? unmask_scores_packed<Half>(a) : unmask_scores_impl<Half>(a); break;
    case kBFloat16:
      packed ? unmask_scores_packed<BFloat16>(a) : unmask_scores_impl<BFloat16>(a);
      break;
    default: fail("unmask_scores: unsupported dtype code ", a.dtype);
  }
}

}  // namespace hk
