// Decoding runs of a bitsandbytes-layout 4-bit weight (NF4 or FP4) into fp32, for the fused kernels.
// Element i of the flattened [rows, cols] weight sits in byte i/2: even i in the high nibble, odd i in
// the low nibble; its value is code[nibble] * absmax[i / blocksize].
#pragma once
#include <algorithm>
#include <cstdint>
#ifdef FORGE_RT_AVX2
#include <immintrin.h>
#endif

namespace forge_qlora {

struct NF4View {
  const uint8_t* packed;
  const float* absmax;  // fp32, one per block (double quantization already resolved)
  const float* code;    // 16 fp32 code values
  int64_t rows, cols, blocksize;
};

inline float nf4_at(const NF4View& w, int64_t i) {
  const uint8_t b = w.packed[i >> 1];
  const int nib = (i & 1) ? (b & 0x0F) : (b >> 4);
  return w.code[nib] * w.absmax[i / w.blocksize];
}

#ifdef FORGE_RT_AVX2
// 16-entry table lookup with two 8-lane permutes; bit 3 of the index picks the upper half.
struct ScaledCode {
  __m256 lo, hi;
  ScaledCode(const float* code, float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    lo = _mm256_mul_ps(_mm256_loadu_ps(code), s);
    hi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), s);
  }
  inline __m256 lookup(__m256i idx) const {
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
    const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  // 16 consecutive elements starting at an even index, from the 8 bytes at p.
  inline void decode16(const uint8_t* p, __m256& v0, __m256& v1) const {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i hi_n = _mm_and_si128(_mm_srli_epi16(bytes, 4), m);
    const __m128i lo_n = _mm_and_si128(bytes, m);
    const __m128i idx = _mm_unpacklo_epi8(hi_n, lo_n);  // element order: hi0, lo0, hi1, lo1, ...
    v0 = lookup(_mm256_cvtepu8_epi32(idx));
    v1 = lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8)));
  }
};
#endif

// Visits dequantized elements [i, i+len) of the flattened weight in order: `vec(o, v0, v1)` gets the
// 16 elements at offset o (AVX2 builds only), `one(o, v)` a single element. Runs are split at quant
// block boundaries so each run has one absmax.
template <class Vec16, class One>
inline void decode_visit(const NF4View& w, int64_t i, int64_t len, Vec16&& vec, One&& one) {
  const int64_t start = i, end = i + len;
  (void)vec;
  while (i < end) {
    const int64_t blk = i / w.blocksize;
    const int64_t stop = std::min(end, (blk + 1) * w.blocksize);
    const float a = w.absmax[blk];
#ifdef FORGE_RT_AVX2
    if ((i & 1) && i < stop) {  // odd start: one scalar element realigns to a byte boundary
      one(i - start, nf4_at(w, i));
      ++i;
    }
    if (stop - i >= 16) {
      const ScaledCode sc(w.code, a);
      for (; i + 16 <= stop; i += 16) {
        __m256 v0, v1;
        sc.decode16(w.packed + (i >> 1), v0, v1);
        vec(i - start, v0, v1);
      }
    }
#endif
    for (; i < stop; ++i) {
      const uint8_t b = w.packed[i >> 1];
      one(i - start, w.code[(i & 1) ? (b & 0x0F) : (b >> 4)] * a);
    }
  }
}

// out[0..len) = dequantized elements [i, i+len) of the flattened weight.
inline void decode_run(const NF4View& w, int64_t i, int64_t len, float* out) {
#ifdef FORGE_RT_AVX2
  auto vec = [out](int64_t o, __m256 v0, __m256 v1) {
    _mm256_storeu_ps(out + o, v0);
    _mm256_storeu_ps(out + o + 8, v1);
  };
#else
  auto vec = [](int64_t, float, float) {};
#endif
  decode_visit(w, i, len, vec, [out](int64_t o, float v) { out[o] = v; });
}

}  // namespace forge_qlora
