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

HK_DECODER_CLONES
void rms_norm_rows(float* x, int64_t x_stride, const float* residual, int64_t residual_stride,
                   const float* weight, float* out, int64_t out_stride, int64_t rows,
                   int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_stride;
    if (residual != nullptr) {
      const float* a = residual + r * residual_stride;
      for (int64_t i = 0; i < dim; ++i) xr[i] = xr[i] + a[i];
    }
    float acc[kAcc] = {};
    int64_t i = 0;
    for (; i + kAcc <= dim; i += kAcc)
      for (int j = 0; j < kAcc; ++j) acc[j] += xr[i + j] * xr[i + j];
    for (; i < dim; ++i) acc[i % kAcc] += xr[i] * xr[i];
    float sum = 0.0f;
    for (int j = 0; j < kAcc; ++j) sum += acc[j];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
    float* o = out + r * out_stride;
    for (int64_t k = 0; k < dim; ++k) o[k] = weight[k] * (xr[k] * inv);
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

HK_DECODER_CLONES
void silu_mul_rows(const float* gate, const float* up, int64_t in_stride, float* out,
                   int64_t out_stride, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + r * in_stride;
    const float* u = up + r * in_stride;
    float* o = out + r * out_stride;
    for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}
}  // namespace

void rms_norm_cpu(const RmsNormArgs& a) {
  rms_norm_rows(a.x, a.x_stride, a.residual, a.residual_stride, a.weight, a.out, a.out_stride,
                a.rows, a.dim, a.eps);
}

void rotary_cpu(const RotaryArgs& a) {
  rotary_rows(a.x, a.rows, a.heads, a.head_dim, a.row_stride, a.head_stride, a.positions, a.cos,
              a.sin, a.table_stride);
}

void silu_mul_cpu(const SiluMulArgs& a) {
  silu_mul_rows(a.gate, a.up, a.in_stride, a.out, a.out_stride, a.rows, a.n);
}

}  // namespace hk
