#include "paging/bitshuffle.h"

#include <cstring>
#ifdef FORGE_RT_AVX2
#include <immintrin.h>
#endif

namespace forge_paging {
namespace {

// Elements [i0, n): forward moves byte b of element i to planes[b][i], Inverse moves it back.
// W is a compile-time width for the common sizes so the compiler unrolls the inner loop.
template <size_t W, bool Inverse>
void transpose_w(uint8_t* flat, uint8_t* const* planes, size_t i0, size_t n, size_t width) {
  const size_t w = W ? W : width;
  for (size_t i = i0; i < n; ++i)
    for (size_t b = 0; b < w; ++b) {
      if (Inverse) flat[i * w + b] = planes[b][i];
      else planes[b][i] = flat[i * w + b];
    }
}

#ifdef FORGE_RT_AVX2
// Within each 128-bit lane: a 4x4 byte transpose (its own inverse) for width 4, and the
// even/odd byte split and its inverse for width 2.
const __m256i kT4 = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                     0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
const __m256i kSplit2 = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
const __m256i kJoin2 = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                        0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);

// 8 elements of 4 bytes per step; returns the elements done.
size_t byte_transpose4_avx2(const uint8_t* src, uint8_t* const* p, size_t n) {
  const __m256i gather = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 4 * i)), kT4);
    v = _mm256_permutevar8x32_epi32(v, gather);  // qword b = 8 bytes of plane b
    alignas(32) uint64_t q[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), v);
    for (int b = 0; b < 4; ++b) std::memcpy(p[b] + i, &q[b], 8);
  }
  return i;
}

size_t byte_untranspose4_avx2(const uint8_t* const* p, uint8_t* dst, size_t n) {
  const __m256i scatter = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    alignas(32) uint64_t q[4];
    for (int b = 0; b < 4; ++b) std::memcpy(&q[b], p[b] + i, 8);
    __m256i v = _mm256_permutevar8x32_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(q)), scatter);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4 * i), _mm256_shuffle_epi8(v, kT4));
  }
  return i;
}

// 16 elements of 2 bytes per step.
size_t byte_transpose2_avx2(const uint8_t* src, uint8_t* const* p, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i)), kSplit2);
    v = _mm256_permute4x64_epi64(v, 0xD8);  // (0, 2, 1, 3): plane 0 low half, plane 1 high half
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[0] + i), _mm256_castsi256_si128(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[1] + i), _mm256_extracti128_si256(v, 1));
  }
  return i;
}

size_t byte_untranspose2_avx2(const uint8_t* const* p, uint8_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i v = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[1] + i)),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[0] + i)));
    v = _mm256_permute4x64_epi64(v, 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), _mm256_shuffle_epi8(v, kJoin2));
  }
  return i;
}
#endif

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

namespace {

// Both directions share one dispatch: AVX2 for widths 2 and 4, then the scalar loop for the rest.
template <bool Inverse>
void transpose(uint8_t* flat, uint8_t* const* planes, size_t n, size_t width, bool simd) {
  size_t i0 = 0;
  (void)simd;
  switch (width) {
    case 1:
      if (Inverse) std::memcpy(flat, planes[0], n);
      else std::memcpy(planes[0], flat, n);
      return;
    case 2:
#ifdef FORGE_RT_AVX2
      if (simd) i0 = Inverse ? byte_untranspose2_avx2(planes, flat, n) : byte_transpose2_avx2(flat, planes, n);
#endif
      return transpose_w<2, Inverse>(flat, planes, i0, n, width);
    case 4:
#ifdef FORGE_RT_AVX2
      if (simd) i0 = Inverse ? byte_untranspose4_avx2(planes, flat, n) : byte_transpose4_avx2(flat, planes, n);
#endif
      return transpose_w<4, Inverse>(flat, planes, i0, n, width);
    case 8: return transpose_w<8, Inverse>(flat, planes, 0, n, width);
    default: return transpose_w<0, Inverse>(flat, planes, 0, n, width);
  }
}

}  // namespace

// The shared dispatch writes through both pointer kinds; each public direction only writes its output.
void byte_transpose(const uint8_t* src, uint8_t* const* planes, size_t n, size_t width, bool simd) {
  transpose<false>(const_cast<uint8_t*>(src), planes, n, width, simd);
}

void byte_untranspose(const uint8_t* const* planes, uint8_t* dst, size_t n, size_t width, bool simd) {
  transpose<true>(dst, const_cast<uint8_t* const*>(planes), n, width, simd);
}

namespace {

template <bool Inverse>
void bits(const uint8_t* in, uint8_t* out, size_t n, bool simd) {
  size_t g0 = 0;
#ifdef FORGE_RT_AVX2
  if (simd) g0 = Inverse ? bits_inverse_avx2(in, out, n) : bits_forward_avx2(in, out, n);
#endif
  (void)simd;
  if (Inverse) bits_inverse_scalar(in, out, n, g0);
  else bits_forward_scalar(in, out, n, g0);
}

}  // namespace

void bit_transpose(const uint8_t* plane, uint8_t* out, size_t n, bool simd) { bits<false>(plane, out, n, simd); }

void bit_untranspose(const uint8_t* in, uint8_t* plane, size_t n, bool simd) { bits<true>(in, plane, n, simd); }

void bitshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd) {
  const size_t n8 = n - n % 8;
  uint8_t* planes[kMaxWidth] = {};
  for (size_t b = 0; b < width; ++b) planes[b] = tmp + b * n8;
  byte_transpose(src, planes, n8, width, simd);
  for (size_t b = 0; b < width; ++b) bit_transpose(planes[b], dst + b * n8, n8, simd);
  std::memcpy(dst + n8 * width, src + n8 * width, (n - n8) * width);
}

void bitunshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd) {
  const size_t n8 = n - n % 8;
  const uint8_t* planes[kMaxWidth] = {};
  for (size_t b = 0; b < width; ++b) {
    bit_untranspose(src + b * n8, tmp + b * n8, n8, simd);
    planes[b] = tmp + b * n8;
  }
  byte_untranspose(planes, dst, n8, width, simd);
  std::memcpy(dst + n8 * width, src + n8 * width, (n - n8) * width);
}

}  // namespace forge_paging
