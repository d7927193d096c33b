// Counter-based LoRA dropout: element i of a tensor is kept iff bits(i) >= threshold, where bits is a
// hash of (i, seed). The mask is a pure function of (seed, i), so forward and backward regenerate it on
// any device without storing it or sharing generator state; forge_rt/kernels/dropout_reference.py is
// the same function in torch integer ops. Why not torch.rand: on the CPU it draws from one mt19937
// stream, 4.8 ns per element, and a demo step draws ~350M of them (a fifth of the step).
#pragma once
#include <cstdint>

#include "common.h"

namespace forge_dropout {

// "lowbias32" (Wellons, hash-prospector): a bijection on 32 bits with near-ideal avalanche.
FORGE_HD inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// 32 random bits for element (hi << 32 | lo) under the key (k0, k1), the seed's low and high words. The key
// enters only after lo is mixed: entered before (lo ^ k0, lo * m + k0), a seed's mask would be a permuted or
// shifted copy of another seed's, with the same drop count on aligned tensors.
FORGE_HD inline uint32_t bits(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
  return mix32(mix32(mix32(lo) ^ k0) + (hi ^ k1));
}

// The kept element's multiplier: scale where bits >= threshold, else 0 (x * 0, as torch's dropout does).
// Compared signed with the top bit flipped: AVX2 has no unsigned 32-bit compare, and this form vectorizes.
FORGE_HD inline float multiplier(uint32_t bits, uint32_t threshold, float scale) {
  const int32_t b = static_cast<int32_t>(bits ^ 0x80000000U), t = static_cast<int32_t>(threshold ^ 0x80000000U);
  return b >= t ? scale : 0.0f;
}

}  // namespace forge_dropout
