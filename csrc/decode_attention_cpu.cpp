// C++ implementation of decode_attention for host memory: what CPU users and CI run, and the
// reference the CUDA kernels are compared with on a GPU. Same split plan and log-sum-exp merge
// as the CUDA path (decode_plan.h); float32 accumulation for every dtype.
//
// For each (row, kv head) the keys stream through once in tiles: a tile of K rows is converted
// to float, scored against all query heads of the group, and the tile's V rows are accumulated
// into every head's output, so each K/V row is read once per row of the batch.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <vector>

#include "common.h"
#include "decode_plan.h"
#include "float_convert.h"

namespace hk {
namespace {

constexpr int kTile = 64;

inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename T>
void to_floats(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
class RowDecoder {
 public:
  RowDecoder(const DecodeArgs& a) : a_(a), G_(a.Hq / a.Hkv), D_(a.D) {
    q_.resize(G_ * D_);
    acc_.resize(G_ * D_);
    m_.resize(G_);
    l_.resize(G_);
    kbuf_.resize(kTile * D_);
    vbuf_.resize(D_);
    scores_.resize(G_ * kTile);
  }

  // Output of the G query heads of kv head `h` for row `b` into out (G x D) and lse2 (G).
  void run(int64_t b, int64_t h, int num_splits, float* out, float* lse2, float* part_o,
           float* part_lse) {
    const float qscale = a_.scale * kLog2e;
    for (int64_t g = 0; g < G_; ++g) {
      const T* qrow = q_row(b, h * G_ + g);
      for (int64_t d = 0; d < D_; ++d) q_[g * D_ + d] = to_float(qrow[d]) * qscale;
    }
    const int64_t n = a_.prefix_len + a_.cache_lens[b];
    if (num_splits <= 1) {
      attend(b, h, {0, n});
      finish(out, lse2);
      return;
    }
    for (int s = 0; s < num_splits; ++s) {
      attend(b, h, split_range(n, num_splits, kTile, s));
      finish(part_o + s * G_ * D_, part_lse + s * G_);
    }
    for (int64_t g = 0; g < G_; ++g)
      for (int64_t d = 0; d < D_; ++d)
        out[g * D_ + d] = merge_partials(num_splits, part_lse + g, G_, part_o + g * D_ + d,
                                         G_ * D_, &lse2[g]);
  }

  int64_t group() const { return G_; }

 private:
  const T* q_row(int64_t b, int64_t hq) const {
    return static_cast<const T*>(a_.q.data) + b * a_.q.stride[0] + hq * a_.q.stride[1];
  }

  // Key j of row b's virtual sequence (prefix first, then the row's own slots).
  const T* key(const View4& cache, const View3& prefix, int64_t b, int64_t h, int64_t j) const {
    if (j < a_.prefix_len)
      return static_cast<const T*>(prefix.data) + j * prefix.stride[0] + h * prefix.stride[1];
    return static_cast<const T*>(cache.data) + b * cache.stride[0] +
           (j - a_.prefix_len) * cache.stride[1] + h * cache.stride[2];
  }

  void attend(int64_t b, int64_t h, KeyRange r) {
    std::fill(m_.begin(), m_.end(), -INFINITY);
    std::fill(l_.begin(), l_.end(), 0.f);
    std::fill(acc_.begin(), acc_.end(), 0.f);
    for (int64_t base = r.begin; base < r.end; base += kTile) {
      const int64_t cnt = std::min<int64_t>(kTile, r.end - base);
      for (int64_t j = 0; j < cnt; ++j)
        to_floats(key(a_.k_cache, a_.k_prefix, b, h, base + j), D_, &kbuf_[j * D_]);
      for (int64_t g = 0; g < G_; ++g) {
        float* s = &scores_[g * kTile];
        float tile_max = -INFINITY;
        for (int64_t j = 0; j < cnt; ++j) {
          s[j] = dot(&q_[g * D_], &kbuf_[j * D_], D_);
          tile_max = std::max(tile_max, s[j]);
        }
        const float m_new = std::max(m_[g], tile_max);
        const float alpha = m_[g] == -INFINITY ? 0.f : std::exp2(m_[g] - m_new);
        float* acc = &acc_[g * D_];
        if (alpha != 1.f)
          for (int64_t d = 0; d < D_; ++d) acc[d] *= alpha;
        float l = l_[g] * alpha;
        for (int64_t j = 0; j < cnt; ++j) {
          s[j] = std::exp2(s[j] - m_new);
          l += s[j];
        }
        l_[g] = l;
        m_[g] = m_new;
      }
      for (int64_t j = 0; j < cnt; ++j) {
        to_floats(key(a_.v_cache, a_.v_prefix, b, h, base + j), D_, vbuf_.data());
        for (int64_t g = 0; g < G_; ++g) {
          const float p = scores_[g * kTile + j];
          float* acc = &acc_[g * D_];
          for (int64_t d = 0; d < D_; ++d) acc[d] += p * vbuf_[d];
        }
      }
    }
  }

  // Normalised output and log2-sum-exp of the keys attended since the last attend().
  void finish(float* out, float* lse2) const {
    for (int64_t g = 0; g < G_; ++g) {
      const bool empty = l_[g] == 0.f;
      const float inv = empty ? 0.f : 1.f / l_[g];
      for (int64_t d = 0; d < D_; ++d) out[g * D_ + d] = acc_[g * D_ + d] * inv;
      lse2[g] = empty ? -INFINITY : m_[g] + std::log2(l_[g]);
    }
  }

  const DecodeArgs& a_;
  const int64_t G_, D_;
  std::vector<float> q_, acc_, m_, l_, kbuf_, vbuf_, scores_;
};

template <typename T>
void decode_rows(const DecodeArgs& a) {
  RowDecoder<T> dec(a);
  const int64_t G = dec.group(), D = a.D;
  const int S = std::max(a.num_splits, 1);
  std::vector<float> out(G * D), lse2(G), part_o(S > 1 ? S * G * D : 0), part_lse(S > 1 ? S * G : 0);
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t h = 0; h < a.Hkv; ++h) {
      dec.run(b, h, S, out.data(), lse2.data(), part_o.data(), part_lse.data());
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = h * G + g;
        T* orow = static_cast<T*>(a.out.data) + b * a.out.stride[0] + hq * a.out.stride[1];
        for (int64_t d = 0; d < D; ++d) orow[d * a.out.stride[2]] = from_float<T>(out[g * D + d]);
        a.lse[b * a.lse_stride[0] + hq * a.lse_stride[1]] = lse2[g] * kLn2;
      }
    }
  }
}

}  // namespace

void decode_attention_cpu(DecodeArgs a) {
  // Check every length before writing anything.
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t len = a.cache_lens[b];
    if (len < 0 || len > a.Lmax) {
      std::ostringstream os;
      os << "decode_attention: cache_lens[" << b << "] = " << len << " is outside [0, Lmax = "
         << a.Lmax << "]";
      throw std::out_of_range(os.str());
    }
    HK_CHECK(len + a.prefix_len > 0, "decode_attention: row ", b,
             " attends no key (cache_lens[", b, "] = 0 and no prefix)");
  }
  switch (a.dtype) {
    case kFloat32: decode_rows<float>(a); break;
    case kFloat16: decode_rows<Half>(a); break;
    case kBFloat16: decode_rows<BFloat16>(a); break;
    default: fail("decode_attention: unsupported dtype code ", a.dtype);
  }
}

}  // namespace hk
