// CUDA NF4/FP4 dequantization: a thin grid-stride wrapper around nf4_hd.h's dequant_element.
#include <cuda_runtime.h>

#include "nf4/nf4_cuda.h"
#include "nf4/nf4_hd.h"

namespace forge_nf4 {

__global__ void dequantize_kernel(const uint8_t* packed, const float* absmax, int64_t n, int blocksize,
                                  int qtype, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = dequant_element(packed, absmax, i, blocksize, qtype);
  }
}

int dequantize_cuda(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, int qtype,
                    float* out, void* stream) {
  if (n <= 0) return 0;
  const int threads = 256;
  const int64_t want = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 65535 ? want : 65535);
  dequantize_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(packed, absmax, n, blocksize,
                                                                              qtype, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace forge_nf4
