// hkemu stand-in for CUDA's cuda_fp16.h: __half / __half2 as 16-bit storage types with exact
// round-to-nearest-even conversions done in integer arithmetic (no compiler _Float16 support
// needed). Only what csrc/ uses, plus the obvious neighbours.
#pragma once

#include <stdint.h>

#include "../hkemu.h"

struct __align__(2) __half {
  uint16_t __x;
  __half() = default;
  __half(float f);  // NOLINT: CUDA's __half converts implicitly from and to float
  operator float() const;
};
struct __align__(4) __half2 {
  __half x, y;
};

namespace hkemu {

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while (!(mant & 0x400u));
    bits = sign | ((112u - uint32_t(e)) << 23) | ((mant & 0x3ffu) << 13);
  }
  return __uint_as_float(bits);
}

inline uint16_t float_to_half_bits_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN (canonical quiet)
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520: inf
  const int32_t exp = int32_t(abs >> 23) - 127;
  if (exp >= -14) {  // normal half
    const uint32_t mant = abs & 0x7fffffu;
    uint32_t h = (uint32_t(exp + 15) << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
    return uint16_t(sign | h);
  }
  if (exp < -25) return sign;  // below half the smallest subnormal
  // Subnormal: value / 2^-24 rounded to an integer, to nearest even.
  const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  const int shift = -exp - 1;  // 14 .. 24: mant * 2^(exp - 23) / 2^-24 = mant >> (-exp - 1)
  uint32_t h = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

}  // namespace hkemu

inline float __half2float(__half h) { return hkemu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) {
  __half h;
  h.__x = hkemu::float_to_half_bits_rn(f);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half::__half(float f) : __x(hkemu::float_to_half_bits_rn(f)) {}
inline __half::operator float() const { return hkemu::half_bits_to_float(__x); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.__x = u;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
