// The elementwise parts of a Llama-style decoder layer on host memory, float32: what a CPU
// decode step does between its matmuls. Each is one pass over rows of a few hundred floats,
// where torch spends more time dispatching its 4-6 ops than computing them.
//
// rotary and the residual add are bitwise torch's ops (products and sums rounded one at a
// time: no FMA contraction in this file); rms_norm sums its squares and silu_mul
// exponentiates in another order / with another exp than torch, a few ulp apart.
#pragma GCC optimize("fp-contract=off")

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace hk {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HK_DECODER_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HK_DECODER_CLONES
#endif

namespace {
constexpr int kAcc = 16;  // independent partial sums: vectorisable, and a fixed order

// One vector of `dim` floats: out = weight * (x / sqrt(mean(x^2) + eps)).
inline void rms_norm_vector(const float* x, const float* weight, float* out, int64_t dim, float eps) {
  float acc[kAcc] = {};
  int64_t i = 0;
  for (; i + kAcc <= dim; i += kAcc)
    for (int j = 0; j < kAcc; ++j) acc[j] += x[i + j] * x[i + j];
  for (; i < dim; ++i) acc[i % kAcc] += x[i] * x[i];
  float sum = 0.0f;
  for (int j = 0; j < kAcc; ++j) sum += acc[j];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
  for (int64_t k = 0; k < dim; ++k) out[k] = weight[k] * (x[k] * inv);
}

HK_DECODER_CLONES
void rms_norm_rows(const RmsNormArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    float* xr = a.x + r * a.x_stride;
    if (a.residual != nullptr) {
      const float* add = a.residual + r * a.residual_stride;
      for (int64_t i = 0; i < a.dim; ++i) xr[i] = xr[i] + add[i];
    }
    for (int64_t g = 0; g < a.groups; ++g)
      rms_norm_vector(xr + g * a.group_stride, a.weight,
                      a.out + r * a.out_stride + g * a.out_group_stride, a.dim, a.eps);
  }
}

HK_DECODER_CLONES
void rotary_rows(float* x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride,
                 int64_t head_stride, const int64_t* positions, const float* cos,
                 const float* sin, int64_t table_stride) {
  const int64_t half = D / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + positions[r] * table_stride;
    const float* s = sin + positions[r] * table_stride;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + r * row_stride + h * head_stride;
      // x * cos + roll(x, D/2) * cat(-sin, sin): the second half is read before it is written.
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        const float lo = a * c[i] + b * s[i];
        const float hi = b * c[i + half] + a * s[i + half];
        v[i] = lo;
        v[i + half] = hi;
      }
    }
  }
}

// e^x for 16 floats within ~2 ulp, in vector operations (glibc's expf is scalar): x = n ln2 + r
// with |r| <= ln2 / 2, e^r by Cephes' polynomial, 2^n from the exponent bits. NaN stays NaN;
// x > 88.37 gives inf (e^x > 2.4e38 there: silu's x / (1 + e^-x) is -0 either way, as torch's);
// x < -87.3 gives ~e^-87.3.
typedef float Vec __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(16 * sizeof(int32_t))));

inline void exp16(Vec& x) {
  const IVec nan = x != x, big = x > 88.37f;
  Vec y = nan ? Vec{} : x;
  y = y > 88.37f ? Vec{} + 88.37f : y;
  y = y < -87.3f ? Vec{} - 87.3f : y;
  const Vec t = y * 1.44269504088896341f + 0.5f;
  IVec n = __builtin_convertvector(t, IVec);  // toward zero; then floor
  n = __builtin_convertvector(n, Vec) > t ? n - 1 : n;  // n in [-126, 127]
  const Vec nf = __builtin_convertvector(n, Vec);
  Vec r = y - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec e = p * (r * r) + r + 1.0f;
  const IVec bits = (n + 127) * (1 << 23);
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const Vec out = big ? Vec{} + std::numeric_limits<float>::infinity() : e * scale;
  x = nan ? x : out;
}

HK_DECODER_CLONES
void silu_mul_rows(const float* gate, const float* up, int64_t in_stride, float* out,
                   int64_t out_stride, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + r * in_stride;
    const float* u = up + r * in_stride;
    float* o = out + r * out_stride;
    for (int64_t i = 0; i < n; i += 16) {
      const int64_t w = n - i < 16 ? n - i : 16;
      Vec gv{}, uv{};
      std::memcpy(&gv, g + i, w * sizeof(float));
      std::memcpy(&uv, u + i, w * sizeof(float));
      Vec e = -gv;
      exp16(e);
      const Vec ov = gv / (1.0f + e) * uv;
      std::memcpy(o + i, &ov, w * sizeof(float));
    }
  }
}
}  // namespace

void rms_norm_cpu(const RmsNormArgs& a) { rms_norm_rows(a); }

void rotary_cpu(const RotaryArgs& a) {
  rotary_rows(a.x, a.rows, a.heads, a.head_dim, a.row_stride, a.head_stride, a.positions, a.cos,
              a.sin, a.table_stride);
}

void silu_mul_cpu(const SiluMulArgs& a) {
  silu_mul_rows(a.gate, a.up, a.in_stride, a.out, a.out_stride, a.rows, a.n);
}

}  // namespace hk
