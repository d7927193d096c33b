// Entry points of the fused kernels: the build of the CPU path that runs (qlora_isa.h).
#include "qlora/qlora_cpu.h"

#include "cpu_path.h"
#include "qlora/qlora_isa.h"

namespace forge_qlora {

std::atomic<int64_t> g_transient{0};

namespace {

const Kernels& kernels() {
#ifdef FORGE_RT_X86_DISPATCH
  if (forge_cpu::avx2()) return avx2::kernels;
#endif
  return generic::kernels;
}

}  // namespace

void forward(const float* x, int64_t M, const NF4View& w, const float* xa, const float* B, int64_t r,
             float s, const float* bias, float* y, int n_threads) {
  kernels().forward(x, M, w, xa, B, r, s, bias, y, n_threads);
}

void backward_input(const float* g, int64_t M, const NF4View& w, const float* gb, const float* A,
                    int64_t r, float s, float* gx, int n_threads) {
  kernels().backward_input(g, M, w, gb, A, r, s, gx, n_threads);
}

void dropout(const float* x, int64_t n, uint32_t k0, uint32_t k1, uint32_t threshold, float scale, float* out,
             int n_threads) {
  kernels().dropout(x, n, k0, k1, threshold, scale, out, n_threads);
}

int64_t last_transient_bytes() { return g_transient; }

}  // namespace forge_qlora
