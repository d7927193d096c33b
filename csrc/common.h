// Definitions every part of forge_rt._C shares (C++ and CUDA sources alike).
#pragma once
#include <cstdint>

// Per-element code in *_hd.h headers runs in the CUDA kernels and in the C++ build (where the CPU
// tests exercise it), so it is marked for both sides under nvcc and left plain elsewhere.
#ifdef __CUDACC__
#define FORGE_HD __host__ __device__
#else
#define FORGE_HD
#endif

// The bindings take pointers as integers (tensor.data_ptr()): no libtorch link.
template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
