// Row driver for the per-block GGML quantizers: what ggml_quantize_chunk does for these types, rows in
// parallel (each row's bytes depend on that row alone, so the thread count cannot change them).
#include "kquant/kquant_cpu.h"

#include "kquant/kquant_hd.h"

namespace forge_kq {

int64_t block_values(int type) {
  switch (type) {
    case kQ4_0: case kQ4_1: case kQ5_0: case kQ5_1: case kQ8_0: return 32;
    case kQ4_K: case kQ5_K: case kQ6_K: return kQK;
    default: return 0;
  }
}

int64_t block_bytes(int type) {
  switch (type) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ8_0: return 34;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    case kQ6_K: return 210;
    default: return 0;
  }
}

namespace {

void legacy_row(int type, const float* x, int64_t n, const float* qw, uint8_t* out) {
  const int64_t nb = n / 32, bb = block_bytes(type);
  if (qw && type != kQ8_0) {  // Q8_0 ignores importance weights in ggml too
    float sum_x2 = 0;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
    const float sigma2 = sum_x2 / n;
    for (int64_t b = 0; b < nb; ++b) weighted_block(x + 32 * b, qw + 32 * b, sigma2, out + bb * b, type);
    return;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    uint8_t* ob = out + bb * b;
    switch (type) {
      case kQ4_0: sym_block_plain(xb, ob, 4); break;
      case kQ5_0: sym_block_plain(xb, ob, 5); break;
      case kQ4_1: affine_block_plain(xb, ob, 4); break;
      case kQ5_1: affine_block_plain(xb, ob, 5); break;
      default: q8_0_block(xb, ob); break;
    }
  }
}

void k_row(int type, const float* x, int64_t n, const float* qw, uint8_t* out) {
  const int64_t nb = n / kQK, bb = block_bytes(type);
  for (int64_t b = 0; b < nb; ++b) {
    const float* wb = qw ? qw + kQK * b : nullptr;
    if (type == kQ6_K) q6_k_superblock(x + kQK * b, wb, out + bb * b);
    else k_affine_superblock(x + kQK * b, wb, out + bb * b, type == kQ5_K ? 5 : 4);
  }
}

}  // namespace

void quantize_rows(int type, const float* src, int64_t nrows, int64_t n_per_row, const float* imatrix,
                   uint8_t* dst) {
  const int64_t row_bytes = n_per_row / block_values(type) * block_bytes(type);
  const bool k = block_values(type) == kQK;
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r = 0; r < nrows; ++r) {
    const float* x = src + r * n_per_row;
    uint8_t* out = dst + r * row_bytes;
    if (k) k_row(type, x, n_per_row, imatrix, out);
    else legacy_row(type, x, n_per_row, imatrix, out);
  }
}

}  // namespace forge_kq
