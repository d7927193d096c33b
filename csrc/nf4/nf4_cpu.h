// CPU (OpenMP) NF4/FP4 blockwise quantize and dequantize over flat element arrays.
#pragma once
#include <cstdint>

namespace forge_nf4 {

enum SrcType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// src: n elements of `src_type`; packed: ceil(n/2) bytes; absmax: ceil(n/blocksize) floats.
// Returns the number of NaN/inf inputs (their blocks' output is meaningless).
int64_t quantize_cpu(const void* src, int src_type, int64_t n, int blocksize, int qtype, uint8_t* packed,
                     float* absmax);

// out: n fp32 values = code[q] * absmax[i / blocksize].
void dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, int qtype,
                    float* out);

}  // namespace forge_nf4
