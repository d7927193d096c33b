// Two stages, each its own inverse pair: (1) byte transpose [n][width] -> [width][n];
// (2) within each byte plane, 8x8 bit-matrix transposes turn 8 bytes into 8 bit-plane bytes.
#include "paging/bitshuffle.h"

#include <cstring>
#ifdef FORGE_RT_AVX2
#include <immintrin.h>
#endif

namespace forge_paging {
namespace {

// W is a compile-time width for the common sizes so the compiler unrolls and vectorizes.
template <size_t W>
void byte_transpose_w(const uint8_t* src, uint8_t* dst, size_t n, size_t width) {
  const size_t w = W ? W : width;
  for (size_t i = 0; i < n; ++i)
    for (size_t b = 0; b < w; ++b) dst[b * n + i] = src[i * w + b];
}

template <size_t W>
void byte_untranspose_w(const uint8_t* src, uint8_t* dst, size_t n, size_t width) {
  const size_t w = W ? W : width;
  for (size_t i = 0; i < n; ++i)
    for (size_t b = 0; b < w; ++b) dst[i * w + b] = src[b * n + i];
}

void byte_transpose(const uint8_t* src, uint8_t* dst, size_t n, size_t width) {
  switch (width) {
    case 1: std::memcpy(dst, src, n); return;
    case 2: return byte_transpose_w<2>(src, dst, n, width);
    case 4: return byte_transpose_w<4>(src, dst, n, width);
    case 8: return byte_transpose_w<8>(src, dst, n, width);
    default: return byte_transpose_w<0>(src, dst, n, width);
  }
}

void byte_untranspose(const uint8_t* src, uint8_t* dst, size_t n, size_t width) {
  switch (width) {
    case 1: std::memcpy(dst, src, n); return;
    case 2: return byte_untranspose_w<2>(src, dst, n, width);
    case 4: return byte_untranspose_w<4>(src, dst, n, width);
    case 8: return byte_untranspose_w<8>(src, dst, n, width);
    default: return byte_untranspose_w<0>(src, dst, n, width);
  }
}

// 8x8 bit matrix transpose of a little-endian uint64 (row r = byte r, column c = bit c).
inline uint64_t transpose8(uint64_t x) {
  uint64_t t;
  t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull; x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull; x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull; x ^= t ^ (t << 28);
  return x;
}

// plane (n bytes, n % 8 == 0) -> 8 bit planes of n/8 bytes each, starting at groups g0..n/8.
void bits_forward_scalar(const uint8_t* plane, uint8_t* out, size_t n, size_t g0) {
  const size_t ng = n / 8;
  for (size_t g = g0; g < ng; ++g) {
    uint64_t x;
    std::memcpy(&x, plane + 8 * g, 8);
    x = transpose8(x);
    for (int j = 0; j < 8; ++j) out[j * ng + g] = uint8_t(x >> (8 * j));
  }
}

void bits_inverse_scalar(const uint8_t* in, uint8_t* plane, size_t n, size_t g0) {
  const size_t ng = n / 8;
  for (size_t g = g0; g < ng; ++g) {
    uint64_t x = 0;
    for (int j = 0; j < 8; ++j) x |= uint64_t(in[j * ng + g]) << (8 * j);
    x = transpose8(x);
    std::memcpy(plane + 8 * g, &x, 8);
  }
}

#ifdef FORGE_RT_AVX2
// 32 bytes at a time: movemask of the byte lanes shifted so bit j sits in each byte's top bit.
size_t bits_forward_avx2(const uint8_t* plane, uint8_t* out, size_t n) {
  const size_t ng = n / 8, blocks = n / 32;
  for (size_t k = 0; k < blocks; ++k) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plane + 32 * k));
    for (int j = 7; j >= 0; --j) {
      uint32_t m = uint32_t(_mm256_movemask_epi8(_mm256_slli_epi16(v, 7 - j)));
      std::memcpy(out + j * ng + 4 * k, &m, 4);
    }
  }
  return blocks * 4;  // groups done
}

// Broadcast each 32-bit mask to 32 bytes (byte i gets mask bit i) and OR bit j into place.
size_t bits_inverse_avx2(const uint8_t* in, uint8_t* plane, size_t n) {
  const size_t ng = n / 8, blocks = n / 32;
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201ll);
  for (size_t k = 0; k < blocks; ++k) {
    __m256i acc = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      uint32_t m;
      std::memcpy(&m, in + j * ng + 4 * k, 4);
      __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(int(m)), spread);
      __m256i hit = _mm256_cmpeq_epi8(_mm256_and_si256(b, select), select);
      acc = _mm256_or_si256(acc, _mm256_and_si256(hit, _mm256_set1_epi8(char(1 << j))));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(plane + 32 * k), acc);
  }
  return blocks * 4;
}
#endif

}  // namespace

void bitshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd) {
  const size_t n8 = n - n % 8;
  byte_transpose(src, tmp, n8, width);
  for (size_t b = 0; b < width; ++b) {
    const uint8_t* plane = tmp + b * n8;
    uint8_t* out = dst + b * n8;
    size_t g0 = 0;
#ifdef FORGE_RT_AVX2
    if (simd) g0 = bits_forward_avx2(plane, out, n8);
#endif
    (void)simd;
    bits_forward_scalar(plane, out, n8, g0);
  }
  std::memcpy(dst + n8 * width, src + n8 * width, (n - n8) * width);
}

void bitunshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd) {
  const size_t n8 = n - n % 8;
  for (size_t b = 0; b < width; ++b) {
    const uint8_t* in = src + b * n8;
    uint8_t* plane = tmp + b * n8;
    size_t g0 = 0;
#ifdef FORGE_RT_AVX2
    if (simd) g0 = bits_inverse_avx2(in, plane, n8);
#endif
    (void)simd;
    bits_inverse_scalar(in, plane, n8, g0);
  }
  byte_untranspose(tmp, dst, n8, width);
  std::memcpy(dst + n8 * width, src + n8 * width, (n - n8) * width);
}

}  // namespace forge_paging
