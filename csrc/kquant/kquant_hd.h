// Per-block GGML quantizers (byte layouts of ggml-common.h, little-endian halves), one function per
// block so a CUDA kernel can run one block per thread: K-quants (256 values) Q4_K, Q5_K, Q6_K, and the
// 32-value legacy types the K mixes fall back to, each in ggml's plain form and in its importance-
// weighted form (what ggml_quantize_chunk runs when given an imatrix).
#pragma once
#include "kquant/kquant_search_hd.h"

namespace forge_kq {

// GGML type ids (ggml.h's enum) and their block sizes.
enum Type : int { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

FORGE_HD inline void put_half(uint8_t* p, float f) {
  const uint16_t h = to_half(f);
  p[0] = static_cast<uint8_t>(h & 0xFF);
  p[1] = static_cast<uint8_t>(h >> 8);
}
FORGE_HD inline float get_half(const uint8_t* p) { return from_half(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// ---- legacy 32-value blocks ----------------------------------------------------------------------

// Nibbles: value j in the low half of byte j, value j+16 in the high half; the 5th bits go to qh.
FORGE_HD inline void pack_32(const uint8_t* L, uint8_t* qs, uint8_t* qh) {
  uint32_t hi = 0;
  for (int j = 0; j < 16; ++j) {
    qs[j] = static_cast<uint8_t>((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4));
    hi |= static_cast<uint32_t>((L[j] & 0x10u) >> 4) << j;
    hi |= static_cast<uint32_t>((L[j + 16] & 0x10u) >> 4) << (j + 16);
  }
  if (qh) for (int b = 0; b < 4; ++b) qh[b] = static_cast<uint8_t>(hi >> (8 * b));
}

// Q4_0 / Q5_0 without weights: d = signed absmax / -(2^(bits-1)), levels truncated after +offset+0.5.
FORGE_HD inline void sym_block_plain(const float* x, uint8_t* out, int bits) {
  float amax = 0, max = 0;
  for (int j = 0; j < 32; ++j) {
    if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
  }
  const int half = 1 << (bits - 1), top = (1 << bits) - 1;
  const float d = max / -half;
  const float id = d ? 1.0f / d : 0.0f;
  const float offset = half + 0.5f;
  uint8_t L[32];
  for (int j = 0; j < 32; ++j) L[j] = static_cast<uint8_t>(kmin(top, static_cast<int>(static_cast<int8_t>(x[j] * id + offset))));
  put_half(out, d);
  pack_32(L, out + (bits == 5 ? 6 : 2), bits == 5 ? out + 2 : nullptr);
}

// Q4_1 / Q5_1 without weights: d = (max - min) / (2^bits - 1), m = min.
FORGE_HD inline void affine_block_plain(const float* x, uint8_t* out, int bits) {
  float min = 3.402823466e+38f, max = -3.402823466e+38f;
  for (int j = 0; j < 32; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
  const int top = (1 << bits) - 1;
  const float d = (max - min) / top;
  const float id = d ? 1.0f / d : 0.0f;
  uint8_t L[32];
  for (int j = 0; j < 32; ++j) {
    const float v = (x[j] - min) * id + 0.5f;
    L[j] = bits == 5 ? static_cast<uint8_t>(v) : static_cast<uint8_t>(kmin(top, static_cast<int>(static_cast<int8_t>(v))));
  }
  put_half(out, d);
  put_half(out + 2, min);
  pack_32(L, out + (bits == 5 ? 8 : 4), bits == 5 ? out + 4 : nullptr);
}

FORGE_HD inline void q8_0_block(const float* x, uint8_t* out) {
  float amax = 0;
  for (int j = 0; j < 32; ++j) amax = kmax(amax, fabsf(x[j]));
  const float d = amax / 127;
  const float id = d ? 1.0f / d : 0.0f;
  put_half(out, d);
  for (int j = 0; j < 32; ++j) out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(roundf(x[j] * id)));
}

// Importance-weighted legacy blocks: weight_j = qw_j * sqrt(sigma2 + x_j^2), sigma2 the row's mean x^2.
FORGE_HD inline void weighted_block(const float* x, const float* qw, float sigma2, uint8_t* out, int type) {
  float w[32];
  uint8_t L[32], Laux[32];
  for (int j = 0; j < 32; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
  if (type == kQ4_0 || type == kQ5_0) {
    const int bits = type == kQ5_0 ? 5 : 4;
    int8_t Ls[32];
    const float d = symmetric_levels(32, 1 << (bits - 1), x, Ls, w);
    for (int j = 0; j < 32; ++j) L[j] = static_cast<uint8_t>(Ls[j]);
    put_half(out, d);
    pack_32(L, out + (bits == 5 ? 6 : 2), bits == 5 ? out + 2 : nullptr);
    return;
  }
  const int bits = type == kQ5_1 ? 5 : 4;
  float min;
  const float d = affine_levels(32, (1 << bits) - 1, x, w, L, &min, Laux, -0.9f, 0.05f, 36, true);
  put_half(out, d);
  put_half(out + 2, -min);
  pack_32(L, out + (bits == 5 ? 8 : 4), bits == 5 ? out + 4 : nullptr);
}

// ---- K-quant super-blocks --------------------------------------------------------------------------

// 6-bit scale ls and min lm of sub-block j into the 12 packed bytes (ggml's get_scale_min_k4 order).
FORGE_HD inline void put_scale_min(uint8_t* s, int j, uint8_t ls, uint8_t lm) {
  if (j < 4) {
    s[j] = ls;
    s[j + 4] = lm;
  } else {
    s[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
    s[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
    s[j] |= static_cast<uint8_t>((lm >> 4) << 6);
  }
}
FORGE_HD inline void get_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63; *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Final Q4_K/Q5_K levels against the rounded 6-bit scales and mins in `out` (a zero scale keeps the
// search's levels, as ggml does), packed: low nibbles of value pairs 32 apart, 5th bits in qh.
FORGE_HD inline void pack_k_affine(const float* x, uint8_t* L, uint8_t* out, int bits) {
  const int nmax = (1 << bits) - 1;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    get_scale_min(out + 4, j, &sc, &m);
    const float d = get_half(out) * sc;
    if (!d) continue;
    const float dm = get_half(out + 2) * m;
    for (int i = 0; i < 32; ++i) L[32 * j + i] = static_cast<uint8_t>(kmax(0, kmin(nmax, nearest_int((x[32 * j + i] + dm) / d))));
  }
  uint8_t* qh = bits == 5 ? out + 16 : nullptr;
  uint8_t* q = out + (bits == 5 ? 48 : 16);
  if (qh) for (int j = 0; j < 32; ++j) qh[j] = 0;
  for (int n = 0, pair = 0; n < kQK; n += 64, ++pair) {
    for (int l = 0; l < 32; ++l) {
      const int l1 = L[n + l], l2 = L[n + l + 32];
      if (qh) qh[l] |= static_cast<uint8_t>(((l1 >> 4) << (2 * pair)) | ((l2 >> 4) << (2 * pair + 1)));
      q[l] = static_cast<uint8_t>((l1 & 0xF) | ((l2 & 0xF) << 4));
    }
    q += 32;
  }
}

// Q4_K (bits 4) and Q5_K (bits 5): 8 sub-blocks of 32 with a 6-bit scale and min each.
// Plain: per-sub-block weights av + |x|, the 8 scales and mins quantized against their max. Weighted
// (qw non-null): weights qw*sqrt(sigma2+x^2), a 37-step search per sub-block, and the 8 scales and
// mins quantized by a weighted search too.
FORGE_HD inline void k_affine_superblock(const float* x, const float* qw, uint8_t* out, int bits) {
  const int nmax = (1 << bits) - 1;
  uint8_t L[kQK], Laux[32], Ls[8], Lm[8];
  float w[32], sw[8], scales[8], mins[8];
  float sigma2 = 0;
  if (qw) {
    for (int l = 0; l < kQK; ++l) sigma2 += x[l] * x[l];
    sigma2 = 2 * sigma2 / kQK;
  }
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    if (qw) {
      for (int l = 0; l < 32; ++l) w[l] = qw[32 * j + l] * sqrtf(sigma2 + xs[l] * xs[l]);
      float sumw = 0;
      for (int l = 0; l < 32; ++l) sumw += w[l];
      sw[j] = sumw;
      scales[j] = affine_levels(32, nmax, xs, w, L + 32 * j, &mins[j], Laux, -0.9f, 0.05f, 36, true);
    } else {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
      const float av_x = sqrtf(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) w[l] = av_x + fabsf(xs[l]);
      scales[j] = bits == 4 ? affine_levels(32, nmax, xs, w, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20, false)
                            : affine_levels(32, nmax, xs, w, L + 32 * j, &mins[j], Laux, -0.5f, 0.1f, 15, false);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
  }
  uint8_t* s = out + 4;
  float d_block, m_block;
  if (qw) {
    d_block = positive_levels(8, 63, scales, Ls, sw);
    m_block = positive_levels(8, 63, mins, Lm, sw);
  } else {
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      Ls[j] = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
      Lm[j] = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
    }
    d_block = max_scale / 63.f;
    m_block = max_min / 63.f;
  }
  for (int j = 0; j < 8; ++j) put_scale_min(s, j, kmin<uint8_t>(63, Ls[j]), kmin<uint8_t>(63, Lm[j]));
  put_half(out, d_block);
  put_half(out + 2, m_block);
  pack_k_affine(x, L, out, bits);
}
// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales; qw (may be null) weights the per-sub-block fit.
FORGE_HD inline void q6_k_superblock(const float* x, const float* qw, uint8_t* out) {
  int8_t L[kQK];
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    scales[ib] = symmetric_levels(16, 32, x + 16 * ib, L + 16 * ib, qw ? qw + 16 * ib : nullptr);
    const float a = fabsf(scales[ib]);
    if (a > max_abs_scale) { max_abs_scale = a; max_scale = scales[ib]; }
  }
  uint8_t* ql = out;
  uint8_t* qh = out + 128;
  int8_t* sc = reinterpret_cast<int8_t*>(out + 192);
  if (max_abs_scale < kGroupMaxEps) {
    for (int i = 0; i < 210; ++i) out[i] = 0;
    return;
  }
  const float iscale = -128.f / max_scale;
  put_half(out + 208, 1 / iscale);
  for (int ib = 0; ib < 16; ++ib) sc[ib] = static_cast<int8_t>(kmin(127, nearest_int(iscale * scales[ib])));
  for (int j = 0; j < 16; ++j) {
    const float d = get_half(out + 208) * sc[j];
    if (!d) continue;
    for (int i = 0; i < 16; ++i) L[16 * j + i] = static_cast<int8_t>(kmax(-32, kmin(31, nearest_int(x[16 * j + i] / d))) + 32);
  }
  for (int j = 0; j < kQK; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const int a = L[j + l], b = L[j + l + 32], c = L[j + l + 64], e = L[j + l + 96];
      ql[l] = static_cast<uint8_t>((a & 0xF) | ((c & 0xF) << 4));
      ql[l + 32] = static_cast<uint8_t>((b & 0xF) | ((e & 0xF) << 4));
      qh[l] = static_cast<uint8_t>((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
}

}  // namespace forge_kq
