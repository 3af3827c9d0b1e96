// float16 / bfloat16 <-> float32 conversions for the C++ CPU implementations (no torch, no
// compiler extensions): round to nearest even, subnormals, infinities and NaN kept.
#pragma once

#include <cstdint>
#include <cstring>

namespace hk {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }

inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);  // +-0
  // Subnormal: shift the mantissa up to an implicit leading one.
  int e = -1;
  do {
    mant <<= 1;
    ++e;
  } while (!(mant & 0x400u));
  return bits_float(sign | (uint32_t(112 - e) << 23) | ((mant & 0x3ffu) << 13));
}

template <typename T>
T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline BFloat16 from_float<BFloat16>(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

template <>
inline Half from_float<Half>(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu))};  // NaN
  if (abs >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds past 65504: inf
  if (abs >= 0x38800000u) {                                    // normal half (>= 2^-14)
    const uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u) - (112u << 23);
    return {uint16_t(sign | (r >> 13))};
  }
  if (abs < 0x33000000u) return {sign};  // below half the smallest subnormal (2^-25): 0
  // Subnormal half: value = mant * 2^-24 with the implicit bit made explicit, rounded to even.
  const uint32_t exp = abs >> 23;
  const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exp;  // 14..24 for exp in [102, 112]
  const uint32_t rounded = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  const uint32_t up = rest > halfway || (rest == halfway && (rounded & 1u));
  return {uint16_t(sign | (rounded + up))};
}

}  // namespace hk
