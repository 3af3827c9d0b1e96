// C++ implementation of decode_attention for host memory: what CPU users and CI run, and the
// reference the CUDA kernels are compared with on a GPU. Same split plan and log-sum-exp merge
// as the CUDA path (decode_plan.h); float32 accumulation for every dtype.
//
// Rows of the batch are processed one at a time, all heads together, so the keys stream through
// memory in order: a tile of kTile keys x all kv heads (contiguous in the [B, Lmax, Hkv, D]
// layout) is converted to float, scored against every query head of each kv head's group, and
// the tile's V rows are accumulated into every head's output. Each K/V row is read once.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <type_traits>
#include <vector>

#include "common.h"
#include "decode_plan.h"
#include "float_convert.h"

namespace hk {
namespace {

constexpr int kTile = 16;

inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// The n values at src as floats: src itself for float32, else converted into buf.
template <typename T>
const float* as_floats(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_float(src[i]);
    return buf;
  }
}

// The hot loop is compiled twice on x86-64 (AVX2 + FMA and baseline), picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HK_CPU_CLONES
#endif

template <typename T>
class RowDecoder {
 public:
  explicit RowDecoder(const DecodeArgs& a)
      : a_(a), G_(a.Hq / a.Hkv), D_(a.D), q_(a.Hq * a.D), acc_(a.Hq * a.D), m_(a.Hq),
        l_(a.Hq), kbuf_(kTile * a.Hkv * a.D), vbuf_(a.D), krows_(kTile * a.Hkv), p_(a.Hq * kTile) {}

  // Output (Hq x D, normalised) and log2-sum-exp (Hq) of row b; part_o / part_lse hold the
  // num_splits partial results (S x Hq x D, S x Hq) when num_splits > 1.
  void run(int64_t b, int num_splits, float* out, float* lse2, float* part_o, float* part_lse) {
    const float qscale = a_.scale * kLog2e;
    for (int64_t hq = 0; hq < a_.Hq; ++hq) {
      const T* qrow = static_cast<const T*>(a_.q.data) + b * a_.q.stride[0] + hq * a_.q.stride[1];
      for (int64_t d = 0; d < D_; ++d) q_[hq * D_ + d] = to_float(qrow[d]) * qscale;
    }
    const int64_t n = a_.prefix_len + a_.cache_lens[b];
    if (num_splits <= 1) {
      attend(b, {0, n});
      finish(out, lse2);
      return;
    }
    const int64_t HD = a_.Hq * D_;
    for (int s = 0; s < num_splits; ++s) {
      attend(b, split_range(n, num_splits, kTile, s));
      finish(part_o + s * HD, part_lse + s * a_.Hq);
    }
    for (int64_t hq = 0; hq < a_.Hq; ++hq)
      for (int64_t d = 0; d < D_; ++d)
        out[hq * D_ + d] = merge_partials(num_splits, part_lse + hq, a_.Hq, part_o + hq * D_ + d,
                                          HD, &lse2[hq]);
  }

 private:
  // Key j of row b's virtual sequence (prefix first, then the row's own slots), kv head h.
  const T* row(const View4& cache, const View3& prefix, int64_t b, int64_t j, int64_t h) const {
    if (j < a_.prefix_len)
      return static_cast<const T*>(prefix.data) + j * prefix.stride[0] + h * prefix.stride[1];
    return static_cast<const T*>(cache.data) + b * cache.stride[0] +
           (j - a_.prefix_len) * cache.stride[1] + h * cache.stride[2];
  }

  HK_CPU_CLONES void attend(int64_t b, KeyRange r) {
    const int64_t Hkv = a_.Hkv;
    std::fill(m_.begin(), m_.end(), -INFINITY);
    std::fill(l_.begin(), l_.end(), 0.f);
    std::fill(acc_.begin(), acc_.end(), 0.f);
    for (int64_t base = r.begin; base < r.end; base += kTile) {
      const int64_t cnt = std::min<int64_t>(kTile, r.end - base);
      for (int64_t j = 0; j < cnt; ++j)
        for (int64_t h = 0; h < Hkv; ++h)
          krows_[j * Hkv + h] = as_floats(row(a_.k_cache, a_.k_prefix, b, base + j, h), D_,
                                          &kbuf_[(j * Hkv + h) * D_]);
      for (int64_t hq = 0; hq < a_.Hq; ++hq) {
        const int64_t h = hq / G_;
        float* p = &p_[hq * kTile];
        float tile_max = -INFINITY;
        for (int64_t j = 0; j < cnt; ++j) {
          p[j] = dot(&q_[hq * D_], krows_[j * Hkv + h], D_);
          tile_max = std::max(tile_max, p[j]);
        }
        const float m_new = std::max(m_[hq], tile_max);
        const float alpha = m_[hq] == -INFINITY ? 0.f : std::exp2(m_[hq] - m_new);
        if (alpha != 1.f)
          for (int64_t d = 0; d < D_; ++d) acc_[hq * D_ + d] *= alpha;
        float l = l_[hq] * alpha;
        for (int64_t j = 0; j < cnt; ++j) {
          p[j] = std::exp2(p[j] - m_new);
          l += p[j];
        }
        l_[hq] = l;
        m_[hq] = m_new;
      }
      for (int64_t j = 0; j < cnt; ++j) {
        for (int64_t h = 0; h < Hkv; ++h) {
          const float* v = as_floats(row(a_.v_cache, a_.v_prefix, b, base + j, h), D_, vbuf_.data());
          for (int64_t hq = h * G_; hq < (h + 1) * G_; ++hq) {
            const float pj = p_[hq * kTile + j];
            float* acc = &acc_[hq * D_];
            for (int64_t d = 0; d < D_; ++d) acc[d] += pj * v[d];
          }
        }
      }
    }
  }

  // Normalised output and log2-sum-exp of the keys attended since the last attend().
  void finish(float* out, float* lse2) const {
    for (int64_t hq = 0; hq < a_.Hq; ++hq) {
      const bool empty = l_[hq] == 0.f;
      const float inv = empty ? 0.f : 1.f / l_[hq];
      for (int64_t d = 0; d < D_; ++d) out[hq * D_ + d] = acc_[hq * D_ + d] * inv;
      lse2[hq] = empty ? -INFINITY : m_[hq] + std::log2(l_[hq]);
    }
  }

  const DecodeArgs& a_;
  const int64_t G_, D_;
  std::vector<float> q_, acc_, m_, l_, kbuf_, vbuf_;
  std::vector<const float*> krows_;
  std::vector<float> p_;
};

template <typename T>
void decode_rows(const DecodeArgs& a) {
  RowDecoder<T> dec(a);
  const int64_t HD = a.Hq * a.D;
  const int S = std::max(a.num_splits, 1);
  std::vector<float> out(HD), lse2(a.Hq), part_o(S > 1 ? S * HD : 0),
      part_lse(S > 1 ? S * a.Hq : 0);
  for (int64_t b = 0; b < a.B; ++b) {
    dec.run(b, S, out.data(), lse2.data(), part_o.data(), part_lse.data());
    for (int64_t hq = 0; hq < a.Hq; ++hq) {
      T* orow = static_cast<T*>(a.out.data) + b * a.out.stride[0] + hq * a.out.stride[1];
      for (int64_t d = 0; d < a.D; ++d) orow[d * a.out.stride[2]] = from_float<T>(out[hq * a.D + d]);
      a.lse[b * a.lse_stride[0] + hq * a.lse_stride[1]] = lse2[hq] * kLn2;
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
