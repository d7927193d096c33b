// Which CPU code path runs. A wheel built on an AVX2 host must still run on an older x86-64 CPU, so
// nothing is compiled for the build machine's CPU: the kernels with intrinsics are compiled once per
// path (generic and AVX2+FMA) and one is chosen when forge_rt._C loads, by what the CPU has.
// aarch64 has one path (NEON is baseline there).
#pragma once
#include <string>
#include <vector>

namespace forge_cpu {

// Chooses the paths: "auto" (by the CPU; also for null or ""), "generic" (baseline instructions only,
// byte-table CRC-32C included) or "avx2" (refused where the build or the CPU lacks it: throws
// std::invalid_argument). The module calls it with FORGE_RT_CPU_PATH at load; tests switch it.
void select(const char* name);
const std::string& selected();
// The SIMD paths this build can run on this CPU, and the one running: "generic", "avx2" (x86-64),
// "neon" (aarch64's only path).
std::vector<std::string> available();
const char* simd();
bool avx2();              // the AVX2+FMA kernels run
bool crc_instructions();  // CRC-32C may use the CPU's CRC instructions (where crc32c.cpp has them)

}  // namespace forge_cpu

// Kernel sources with intrinsics are compiled once per path: as they are, and from an *_avx2.cpp file
// that defines FORGE_RT_AVX2 first. Their code sits in namespace FORGE_ISA (generic / avx2), so the
// copies share no symbol, and between FORGE_ISA_BEGIN / FORGE_ISA_END, which turn AVX2+FMA on for
// the functions defined in between only. Such a file includes its headers before FORGE_ISA_BEGIN:
// inline library code (std::vector, <algorithm>) then stays baseline in every object, and the
// linker cannot keep an AVX2 copy of it that the generic path would call on an older CPU.
#ifdef FORGE_RT_AVX2
#include <immintrin.h>
#define FORGE_ISA avx2
#if defined(__clang__)
#define FORGE_ISA_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define FORGE_ISA_END _Pragma("clang attribute pop")
#else
#define FORGE_ISA_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define FORGE_ISA_END _Pragma("GCC pop_options")
#endif
#else
#define FORGE_ISA generic
#define FORGE_ISA_BEGIN
#define FORGE_ISA_END
#endif
