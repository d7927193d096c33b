// Per-element NF4/FP4 work shared by the C++ CPU kernels and the CUDA kernels: the code books,
// nibble unpacking and quantize-to-nearest-code. Bit-compatible with bitsandbytes 0.50's
// quantize_4bit/dequantize_4bit (the fp32 values below are bitsandbytes' tables exactly).
#pragma once
#include <cstdint>

#include "common.h"

namespace forge_nf4 {

enum QuantType : int { kNF4 = 0, kFP4 = 1 };

// Value of 4-bit code `q` (0..15), before scaling by the block's absmax.
FORGE_HD inline float code_value(int q, int qtype) {
  const float nf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                         -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                         0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                         0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                         0.7229568362236023f, 1.0f};
  // bitsandbytes' fp4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, divided by 12 in fp32.
  const float fp4[16] = {0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f,
                         2.0f / 12.0f, 3.0f / 12.0f, -0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
                         -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f};
  return qtype == kFP4 ? fp4[q & 15] : nf4[q & 15];
}

// The code at position `pos` when the code book is sorted by value (identity for nf4).
FORGE_HD inline int value_order(int pos, int qtype) {
  const int fp4_order[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};
  return qtype == kFP4 ? fp4_order[pos & 15] : pos;
}

// Code of the packed element `i`: the first element of each byte is in the HIGH nibble.
FORGE_HD inline int unpack(const uint8_t* packed, int64_t i) {
  const uint8_t b = packed[i >> 1];
  return (i & 1) ? (b & 15) : (b >> 4);
}

FORGE_HD inline float dequant_element(const uint8_t* packed, const float* absmax, int64_t i,
                                      int blocksize, int qtype) {
  return code_value(unpack(packed, i), qtype) * absmax[i / blocksize];
}

// Midpoints between neighbouring codes in value order (15 of them), as fp32 (a + b) / 2.
FORGE_HD inline void fill_midpoints(float mids[15], int qtype) {
  for (int k = 0; k < 15; ++k) {
    mids[k] = (code_value(value_order(k, qtype), qtype) + code_value(value_order(k + 1, qtype), qtype)) / 2.0f;
  }
}

// Nearest code to `x` (already scaled into [-1, 1]). Like torch.bucketize(x, mids): a value exactly
// on a midpoint goes to the lower code.
FORGE_HD inline int quantize_scaled(float x, const float mids[15], int qtype) {
  int pos = 0;
  for (int k = 0; k < 15; ++k) pos += x > mids[k] ? 1 : 0;
  return value_order(pos, qtype);
}

// Scale one element of a block into [-1, 1] the way bitsandbytes does: full blocks multiply by the
// fp32 reciprocal of absmax, the trailing partial block divides by it.
FORGE_HD inline float scale_into_unit(float v, float absmax_clamped, bool partial_block) {
  const float s = partial_block ? v / absmax_clamped : v * (1.0f / absmax_clamped);
  return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
}

FORGE_HD inline float bf16_bits_to_float(uint16_t h) {
  union { uint32_t u; float f; } c;
  c.u = static_cast<uint32_t>(h) << 16;
  return c.f;
}

// Exact IEEE half -> float (normals, subnormals, inf, nan).
FORGE_HD inline float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exp = 113u;
    while ((man & 0x400u) == 0) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  union { uint32_t u; float f; } c;
  c.u = bits;
  return c.f;
}

}  // namespace forge_nf4
