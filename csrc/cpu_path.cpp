#include "cpu_path.h"

#include <atomic>
#include <stdexcept>

namespace forge_cpu {
namespace {

enum : int { kAvx2 = 1, kCrc = 2 };

std::atomic<int> g_paths{0};  // kAvx2 | kCrc bits; baseline until select() runs at load
std::string g_selected = "auto";

// What the CPU (and the OS, for AVX state) supports of what this build compiled.
int detect() {
  int paths = 0;
#if defined(__x86_64__)
  __builtin_cpu_init();  // select() may run before libgcc's own constructor
#ifdef FORGE_RT_X86_DISPATCH
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths |= kAvx2;
#endif
  if (__builtin_cpu_supports("sse4.2")) paths |= kCrc;
#else
  paths |= kCrc;  // aarch64: crc32c.cpp has the instructions only when built with them
#endif
  return paths;
}

}  // namespace

void select(const char* name) {
  const std::string want = name && *name ? name : "auto";
  const int have = detect();
  int paths;
  if (want == "auto") {
    paths = have;
  } else if (want == "generic") {
    paths = 0;
  } else if (want == "avx2") {
    if (!(have & kAvx2)) throw std::invalid_argument("FORGE_RT_CPU_PATH=avx2: this CPU or build has no AVX2+FMA path");
    paths = have;
  } else {
    throw std::invalid_argument("FORGE_RT_CPU_PATH=" + want + ": use auto, generic or avx2");
  }
  g_paths = paths;
  g_selected = want;
}

const std::string& selected() { return g_selected; }

std::vector<std::string> available() {
#if defined(__aarch64__)
  return {"neon"};
#else
  if (detect() & kAvx2) return {"generic", "avx2"};
  return {"generic"};
#endif
}

const char* simd() {
#if defined(__aarch64__)
  return "neon";
#else
  return avx2() ? "avx2" : "generic";
#endif
}

bool avx2() { return g_paths.load(std::memory_order_relaxed) & kAvx2; }

bool crc_instructions() { return g_paths.load(std::memory_order_relaxed) & kCrc; }

}  // namespace forge_cpu
