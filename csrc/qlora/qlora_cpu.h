// Fused 4-bit LoRA linear on the CPU (fp32 compute, OpenMP). The 4-bit weight is dequantized tile by
// tile into per-thread buffers inside the matmul; the full-precision weight is never materialized.
#pragma once
#include <cstdint>

namespace forge_qlora {

struct NF4View {
  const uint8_t* packed;
  const float* absmax;  // fp32, one per block (double quantization already resolved)
  const float* code;    // 16 fp32 code values
  int64_t rows, cols, blocksize;
};

// y[M,N] = x[M,K] @ W^T + bias + s * xa[M,r] @ B[N,r]^T   (bias, xa/B may be null; r may be 0)
void forward(const float* x, int64_t M, const NF4View& w, const float* xa, const float* B, int64_t r,
             float s, const float* bias, float* y, int n_threads);

// gx[M,K] = g[M,N] @ W + s * gb[M,r] @ A[r,K]   (gb/A may be null; r may be 0)
void backward_input(const float* g, int64_t M, const NF4View& w, const float* gb, const float* A,
                    int64_t r, float s, float* gx, int n_threads);

// out[n] = x * scale where the element's counter hash (dropout_hd.h) >= threshold, else 0 (LoRA dropout).
void dropout(const float* x, int64_t n, uint32_t k0, uint32_t k1, uint32_t threshold, float scale, float* out,
             int n_threads);

// Bytes of scratch buffers (all threads) the last call allocated; the memory bench reads it.
int64_t last_transient_bytes();

}  // namespace forge_qlora
