// Launchers for the CUDA NF4 kernels (nf4_dequant.cu). Plain C++ so the pybind file can call them.
#pragma once
#include <cstdint>

namespace forge_nf4 {

// out[i] = code[q_i] * absmax[i / blocksize] for i < n, on `stream` (a cudaStream_t; 0 = default).
// Pointers are device pointers. Returns a cudaError_t value (0 = success).
int dequantize_cuda(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, int qtype,
                    float* out, void* stream);

}  // namespace forge_nf4
