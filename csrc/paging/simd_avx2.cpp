// AVX2 kernels of the bit-shuffle and the codec's bf16-in-fp32 check (see simd_avx2.h).
#define FORGE_RT_AVX2 1
#include "paging/simd_avx2.h"

#include <cstring>

#include "cpu_path.h"

FORGE_ISA_BEGIN
namespace forge_paging {
namespace avx2 {
namespace {

// Within each 128-bit lane: a 4x4 byte transpose (its own inverse) for width 4, and the
// even/odd byte split and its inverse for width 2. Functions, not globals: a global's initializer
// would run at load, on CPUs without AVX2 too.
inline __m256i t4() {
  return _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                          0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}
inline __m256i split2() {
  return _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                          0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
}
inline __m256i join2() {
  return _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                          0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
}

}  // namespace

// 8 elements of 4 bytes per step.
size_t byte_transpose4(const uint8_t* src, uint8_t* const* p, size_t n) {
  const __m256i gather = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), k = t4();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 4 * i)), k);
    v = _mm256_permutevar8x32_epi32(v, gather);  // qword b = 8 bytes of plane b
    alignas(32) uint64_t q[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), v);
    for (int b = 0; b < 4; ++b) std::memcpy(p[b] + i, &q[b], 8);
  }
  return i;
}

size_t byte_untranspose4(const uint8_t* const* p, uint8_t* dst, size_t n) {
  const __m256i scatter = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7), k = t4();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    alignas(32) uint64_t q[4];
    for (int b = 0; b < 4; ++b) std::memcpy(&q[b], p[b] + i, 8);
    __m256i v = _mm256_permutevar8x32_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(q)), scatter);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4 * i), _mm256_shuffle_epi8(v, k));
  }
  return i;
}

// 16 elements of 2 bytes per step.
size_t byte_transpose2(const uint8_t* src, uint8_t* const* p, size_t n) {
  const __m256i k = split2();
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i)), k);
    v = _mm256_permute4x64_epi64(v, 0xD8);  // (0, 2, 1, 3): plane 0 low half, plane 1 high half
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[0] + i), _mm256_castsi256_si128(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[1] + i), _mm256_extracti128_si256(v, 1));
  }
  return i;
}

size_t byte_untranspose2(const uint8_t* const* p, uint8_t* dst, size_t n) {
  const __m256i k = join2();
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i v = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[1] + i)),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[0] + i)));
    v = _mm256_permute4x64_epi64(v, 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), _mm256_shuffle_epi8(v, k));
  }
  return i;
}

// 32 bytes at a time: movemask of the byte lanes shifted so bit j sits in each byte's top bit.
size_t bits_forward(const uint8_t* plane, uint8_t* out, size_t n) {
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
size_t bits_inverse(const uint8_t* in, uint8_t* plane, size_t n) {
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

bool low16_zero_blocks(const uint32_t* x, uint64_t n, uint64_t* done) {
  const __m256i mask = _mm256_set1_epi32(0xFFFF);
  uint64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // 128 bytes per test: early exit stays cheap on real fp32 data
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k)
      acc = _mm256_or_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * k)));
    if (!_mm256_testz_si256(acc, mask)) return false;
  }
  *done = i;
  return true;
}

}  // namespace avx2
}  // namespace forge_paging
FORGE_ISA_END
