// hkemu stand-in for CUDA's cuda_bf16.h: __nv_bfloat16 / __nv_bfloat162 as 16-bit storage types
// with exact round-to-nearest-even conversions. Only what csrc/ uses, plus the obvious neighbours.
#pragma once

#include <stdint.h>

#include "../hkemu.h"

struct __align__(2) __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f);  // NOLINT: converts implicitly, as CUDA's
  operator float() const;
};
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace hkemu {

inline uint16_t float_to_bf16_bits_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace hkemu

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  __nv_bfloat16 h;
  h.__x = hkemu::float_to_bf16_bits_rn(f);
  return h;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat16::__nv_bfloat16(float f) : __x(hkemu::float_to_bf16_bits_rn(f)) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {__bfloat162float(h.x), __bfloat162float(h.y)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
