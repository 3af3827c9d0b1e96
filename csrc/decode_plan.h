// The split plan of decode_attention and its log-sum-exp merge, shared by the CUDA kernels and
// the C++ CPU implementation so both cut and merge a row's keys the same way.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define HK_HD __host__ __device__ __forceinline__
#else
#define HK_HD inline
#endif

namespace hk {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Each split gets at least this many keys, so the merge stays a small part of the traffic.
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int kMaxAutoSplits = 128;

struct KeyRange {
  int64_t begin, end;  // empty when begin >= end
};

// Keys [begin, end) of split `s` when a row's `n` keys are cut into `num_splits` equal chunks
// rounded up to whole tiles of `tile` keys (trailing splits of a short row may be empty).
HK_HD KeyRange split_range(int64_t n, int num_splits, int tile, int s) {
  const int64_t per_split = (n + num_splits - 1) / num_splits;
  const int64_t chunk = (per_split + tile - 1) / tile * tile;
  const int64_t begin = int64_t(s) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  return {begin, end};
}

// Merges the partial results of `n` splits for one output element: lse2[s * lse_stride] is split
// s's log2-sum-exp (-inf when it saw no key) and o[s * o_stride] its normalised output. Returns
// the merged output (0 when no split saw a key; NaN when a split's log2-sum-exp is NaN, as the
// unsplit softmax) and stores the merged log2-sum-exp in *total_lse2.
HK_HD float merge_partials(int n, const float* lse2, int64_t lse_stride, const float* o,
                           int64_t o_stride, float* total_lse2) {
  float m = -INFINITY;
  bool nan = false;
  for (int s = 0; s < n; ++s) {
    const float x = lse2[s * lse_stride];
    m = fmaxf(m, x);  // skips NaN
    nan = nan || x != x;
  }
  if (nan) {
    *total_lse2 = NAN;
    return NAN;
  }
  if (m == -INFINITY) {
    *total_lse2 = -INFINITY;
    return 0.f;
  }
  float sum = 0.f, acc = 0.f;
  for (int s = 0; s < n; ++s) {
    const float w = exp2f(lse2[s * lse_stride] - m);  // 0 for empty splits
    sum += w;
    if (w > 0.f) acc += w * o[s * o_stride];
  }
  *total_lse2 = m + log2f(sum);
  return acc / sum;
}

// Split count for `work` independent (row, head-group) items of up to `max_keys` keys on a
// device that runs `slots` blocks at once: enough splits to fill whole waves (the fewest that
// reach 85% of the best wave efficiency), never fewer than kMinKeysPerSplit keys per split.
inline int choose_num_splits(int64_t work, int64_t slots, int64_t max_keys) {
  if (work <= 0 || slots <= 0 || work * 5 >= slots * 4) return 1;
  int64_t limit = max_keys / kMinKeysPerSplit;
  if (limit > kMaxAutoSplits) limit = kMaxAutoSplits;
  if (limit <= 1) return 1;
  auto efficiency = [&](int64_t s) {
    const double waves = double(work * s) / double(slots);
    return waves / std::ceil(waves);
  };
  double best = 0.;
  for (int64_t s = 1; s <= limit; ++s) best = std::fmax(best, efficiency(s));
  for (int64_t s = 1; s <= limit; ++s)
    if (efficiency(s) >= 0.85 * best) return int(s);
  return 1;
}

}  // namespace hk
