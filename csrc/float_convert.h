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

// Branch-free (vectorisable) and exact; uses no float subnormals, so it is immune to DAZ.
inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t em = x.bits & 0x7fffu;
  const uint32_t exp = em >> 10;
  const uint32_t normal = (em << 13) + (112u << 23);                               // exp 1..30
  const uint32_t subnormal = float_bits(float(int32_t(em & 0x3ffu)) * 0x1p-24f);  // exp 0
  const uint32_t special = (em << 13) | 0x7f800000u;                               // inf / NaN
  const uint32_t is_sub = 0u - uint32_t(exp == 0), is_special = 0u - uint32_t(exp == 0x1fu);
  const uint32_t bits = (subnormal & is_sub) | (special & is_special) | (normal & ~(is_sub | is_special));
  return bits_float(bits | sign);
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
