// Scale searches behind ggml's block quantizers (K-quants and the weighted legacy types), written to
// produce the same floats as ggml-quants.c: every sum runs in the same order and association, and the
// kquant sources are built with -ffp-contract=off (ggml's x86-64 baseline build has no FMA to fuse
// with). Any reordering here changes bytes; tests/export/test_kquant.py compares with ggml itself.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace forge_kq {

constexpr int kQK = 256;                  // values per K-quant super-block
constexpr float kGroupMaxEps = 1e-15f;    // below this absmax a group is all zero (ggml's GROUP_MAX_EPS)

FORGE_HD inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
FORGE_HD inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
template <class T> FORGE_HD inline T kmin(T a, T b) { return a < b ? a : b; }  // ggml's MIN/MAX: NaN order matters
template <class T> FORGE_HD inline T kmax(T a, T b) { return a > b ? a : b; }

// IEEE half, round to nearest even; NaN becomes the quiet 0x7E00 with its sign (as ggml's converter).
FORGE_HD inline uint16_t to_half(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;
  if (a >= 0x477FF000u) return sign | 0x7C00u;          // rounds to >= 65520: infinity
  if (a >= 0x38800000u) {                               // normal half
    const uint32_t mant = a & 0x7FFFFFu;
    uint32_t h = ((a >> 23) - 112u) << 10 | (mant >> 13);
    const uint32_t rest = mant & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  if (a < 0x33000000u) return sign;                     // below half the smallest subnormal
  const uint32_t e = a >> 23;
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;                      // subnormal: value = mant >> (shift) in 2^-24 units
  uint32_t h = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

FORGE_HD inline float from_half(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e != 0) return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
  return (sign ? -1.0f : 1.0f) * static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
}

// Round to nearest (ties to even) through the 1.5 * 2^23 bias, as ggml does; valid for |f| < 2^22.
FORGE_HD inline int nearest_int(float f) {
  const float biased = f + 12582912.f;
  int i; memcpy(&i, &biased, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// Symmetric levels in [-nmax, nmax-1] (stored as l + nmax) with weights qw, or x^2 when qw is null;
// tries 18 scales around -nmax/max and keeps the best weighted least-squares fit. Returns the scale.
FORGE_HD inline float symmetric_levels(int n, int nmax, const float* x, int8_t* L, const float* qw) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = fabsf(x[i]);
    if (ax > amax) { amax = ax; max = x[i]; }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = kmax(-nmax, kmin(nmax - 1, nearest_int(iscale * x[i])));
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = qw ? qw[i] : x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = kmax(-nmax, kmin(nmax - 1, nearest_int(iscale * x[i])));
      const float w = qw ? qw[i] : x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + kmax(-nmax, kmin(nmax - 1, nearest_int(iscale * x[i]))));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Weighted error of levels Lv under scale/min (squared: the K-quant searches never use abs).
FORGE_HD inline float affine_error(int n, const float* x, const float* w, const uint8_t* Lv, float scale, float min) {
  float err = 0;
  for (int i = 0; i < n; ++i) {
    float diff = scale * Lv[i] + min - x[i];
    diff = diff * diff;
    err += w[i] * diff;
  }
  return err;
}

// Levels in [0, nmax] with x ~ scale*l - the_min, min <= 0. Scans nstep+1 inverse scales
// (rmin + rdelta*is + nmax)/(max-min), each refit by weighted least squares for scale and min.
// `strict_empty` picks ggml's two variants: max <= min (qkx3) versus max == min (qkx2).
FORGE_HD inline float affine_levels(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min,
                                    uint8_t* Laux, float rmin, float rdelta, int nstep, bool strict_empty) {
  float min = x[0], max = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (strict_empty ? (max <= min) : (max == min)) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(kmax(0, kmin(nmax, nearest_int(iscale * (x[i] - min)))));
  float best = affine_error(n, x, w, L, scale, min);
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = kmax(0, kmin(nmax, nearest_int(iscale * (x[i] - min))));
      Laux[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (!(D > 0)) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    if (this_min > 0) {
      this_min = 0;
      this_scale = sum_xl / sum_l2;
    }
    const float err = affine_error(n, x, w, Laux, this_scale, this_min);
    if (err < best) {
      for (int i = 0; i < n; ++i) L[i] = Laux[i];
      best = err;
      scale = this_scale;
      min = this_min;
    }
  }
  *the_min = -min;
  return scale;
}

// Non-negative levels in [0, nmax] for the 8 sub-block scales (or mins) of a super-block, weighted
// by each sub-block's weight sum: 8 trial scales, then up to 5 passes of one-level refinements.
FORGE_HD inline float positive_levels(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = kmax(max, x[i]);
  if (max < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = nmax / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_int(iscale * x[i]));
  const float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    best += w[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * is + nmax) / max;
    const float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      const int l = kmin(nmax, nearest_int(iscale_is * x[i]));
      const float diff = x[i] - scale_is * l;
      mse += w[i] * diff * diff;
    }
    if (mse < best) { best = mse; iscale = iscale_is; }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = kmin(nmax, nearest_int(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    sumlx += w[i] * x[i] * l;
    suml2 += w[i] * l * l;
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      float slx = sumlx - w[i] * x[i] * L[i];
      float sl2 = suml2 - w[i] * L[i] * L[i];
      if (!(slx > 0 && sl2 > 0)) continue;
      const int nl = kmin(nmax, nearest_int(x[i] * sl2 / slx));
      if (nl == L[i]) continue;
      slx += w[i] * x[i] * nl;
      sl2 += w[i] * nl * nl;
      if (slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = static_cast<uint8_t>(nl); sumlx = slx; suml2 = sl2;
        ++changed;
      }
    }
    if (!changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

}  // namespace forge_kq
