// Decoding runs of a bitsandbytes-layout 4-bit weight (NF4 or FP4) into fp32, for the fused kernels.
// Element i of the flattened [rows, cols] weight sits in byte i/2: even i in the high nibble, odd i in
// the low nibble; its value is code[nibble] * absmax[i / blocksize]. Compiled per CPU path with the
// kernels (qlora_kernels.inc; see cpu_path.h).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_path.h"
#include "nf4/nf4_hd.h"
#include "qlora/qlora_cpu.h"

FORGE_ISA_BEGIN
namespace forge_qlora {
namespace FORGE_ISA {

inline float nf4_at(const NF4View& w, int64_t i) {
  return w.code[forge_nf4::unpack(w.packed, i)] * w.absmax[i / w.blocksize];
}

#ifdef FORGE_RT_AVX2
template <int N>
struct Vecs {  // N vectors of 8 decoded elements, passed to visitor callbacks
  __m256 v[N];
};

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
        vec(i - start, Vecs<2>{{v0, v1}});
      }
    }
#endif
    for (; i < stop; ++i) one(i - start, w.code[forge_nf4::unpack(w.packed, i)] * a);
  }
}

// out[0..len) = dequantized elements [i, i+len) of the flattened weight.
inline void decode_run(const NF4View& w, int64_t i, int64_t len, float* out) {
#ifdef FORGE_RT_AVX2
  auto vec = [out](int64_t o, const Vecs<2>& v) {
    _mm256_storeu_ps(out + o, v.v[0]);
    _mm256_storeu_ps(out + o + 8, v.v[1]);
  };
#else
  auto vec = [](int64_t, int) {};
#endif
  decode_visit(w, i, len, vec, [out](int64_t o, float v) { out[o] = v; });
}

// Position q of a decode32 group (4 vectors of 8) holds element perm32_index(q) of the group.
inline int perm32_index(int q) {
  const int v = q / 8, lane = (q % 8) / 4, t = q % 4;
  return 8 * v + 2 * t + (lane == 0 ? 1 : 0);
}

#ifdef FORGE_RT_AVX2
// Byte-plane lookup: 32 elements (16 bytes) decoded with four in-lane byte shuffles, one per byte of
// the fp32 code values, in the fixed order of perm32_index (GEMV inputs are permuted to match).
struct Perm32Code {
  __m256i plane[4];
  explicit Perm32Code(const float* code) {
    alignas(16) uint8_t t[4][16];
    for (int e = 0; e < 16; ++e) {
      uint32_t u;
      std::memcpy(&u, code + e, 4);
      for (int b = 0; b < 4; ++b) t[b][e] = static_cast<uint8_t>(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b)
      plane[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t[b])));
  }
  inline Vecs<4> decode32(const uint8_t* p, __m256 scale) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    // lane 0: low nibbles (odd elements), lane 1: high nibbles (even elements)
    const __m256i idx = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), m), _mm_and_si128(bytes, m));
    const __m256i p0 = _mm256_shuffle_epi8(plane[0], idx), p1 = _mm256_shuffle_epi8(plane[1], idx);
    const __m256i p2 = _mm256_shuffle_epi8(plane[2], idx), p3 = _mm256_shuffle_epi8(plane[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(p0, p1), h01 = _mm256_unpackhi_epi8(p0, p1);
    const __m256i l23 = _mm256_unpacklo_epi8(p2, p3), h23 = _mm256_unpackhi_epi8(p2, p3);
    return {{_mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)), scale),
            _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)), scale),
            _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)), scale),
            _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)), scale)}};
  }
};

// Visits elements [i, i+len) in 32-element groups: vec(o, v) gets decode32's 4 vectors for offset o.
// Precondition (perm32_ok): i is even and every quant block boundary in the range is 32-aligned to i.
template <class Vec32>
inline void decode_visit_perm32(const NF4View& w, const Perm32Code& pc, int64_t i, int64_t len, Vec32&& vec) {
  const int64_t start = i, end = i + len;
  while (i < end) {
    const int64_t blk = i / w.blocksize;
    const int64_t stop = std::min(end, (blk + 1) * w.blocksize);
    const __m256 scale = _mm256_set1_ps(w.absmax[blk]);
    for (; i < stop; i += 32) vec(i - start, pc.decode32(w.packed + (i >> 1), scale));
  }
}
#endif

// Whether rows of `w` can be read with decode_visit_perm32 (row starts and blocks 32-aligned).
inline bool perm32_ok(const NF4View& w) {
#ifdef FORGE_RT_AVX2
  return w.cols % 32 == 0 && w.blocksize % 32 == 0;
#else
  (void)w;
  return false;
#endif
}

}  // namespace FORGE_ISA
}  // namespace forge_qlora
FORGE_ISA_END
