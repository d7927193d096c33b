// CPU NF4/FP4 kernels: one OpenMP task per quantization block; the per-element work is nf4_hd.h.
#include "nf4/nf4_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "nf4/nf4_hd.h"

namespace forge_nf4 {

namespace {

inline float load(const void* src, int src_type, int64_t i) {
  switch (src_type) {
    case kF16: return fp16_bits_to_float(static_cast<const uint16_t*>(src)[i]);
    case kBF16: return bf16_bits_to_float(static_cast<const uint16_t*>(src)[i]);
    default: return static_cast<const float*>(src)[i];
  }
}

// bitsandbytes clamps absmax to this before scaling (the python double 1e-38 cast to fp32, as torch does).
const float kAbsmaxFloor = static_cast<float>(1e-38);

}  // namespace

int64_t quantize_cpu(const void* src, int src_type, int64_t n, int blocksize, int qtype, uint8_t* packed,
                     float* absmax) {
  int64_t nonfinite = 0;
  float mids[15];
  fill_midpoints(mids, qtype);
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  const int64_t n_full = n / blocksize;
#pragma omp parallel
  {
    std::vector<float> vals(blocksize + 1);
    std::vector<uint8_t> codes(blocksize + 1);
#pragma omp for schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min<int64_t>(blocksize, n - start);
      float amax = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        vals[j] = load(src, src_type, start + j);
        amax = std::max(amax, std::fabs(vals[j]));
        // NaN/inf make the block meaningless; count them so the caller can refuse the weight.
        nonfinite += std::isfinite(vals[j]) ? 0 : 1;
      }
      const bool partial = b >= n_full;
      const float clamped = std::max(amax, kAbsmaxFloor);
      // bitsandbytes stores the clamped absmax only for the trailing partial block.
      absmax[b] = partial ? clamped : amax;
      for (int64_t j = 0; j < len; ++j) {
        codes[j] = static_cast<uint8_t>(quantize_scaled(scale_into_unit(vals[j], clamped, partial), mids, qtype));
      }
      // An odd element count is padded with a 0.0 element, as bitsandbytes does.
      if (len & 1) codes[len] = static_cast<uint8_t>(quantize_scaled(0.0f, mids, qtype));
      uint8_t* out = packed + start / 2;
      for (int64_t j = 0; j < len; j += 2) out[j / 2] = static_cast<uint8_t>((codes[j] << 4) | codes[j + 1]);
    }
  }
  return nonfinite;
}

void dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, int qtype,
                    float* out) {
  float table[16];
  for (int q = 0; q < 16; ++q) table[q] = code_value(q, qtype);
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min<int64_t>(blocksize, n - start);
    const float scale = absmax[b];
    for (int64_t j = 0; j < len; ++j) out[start + j] = table[unpack(packed, start + j)] * scale;
  }
}

}  // namespace forge_nf4
