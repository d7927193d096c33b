// The fused kernels are compiled once per CPU path (qlora_generic.cpp, qlora_avx2.cpp, both from
// qlora_kernels.inc); each build exports its entry points as a table and qlora_cpu.cpp calls the
// table of the path that runs.
#pragma once
#include <atomic>
#include <cstdint>

#include "qlora/qlora_cpu.h"

namespace forge_qlora {

using ForwardFn = decltype(&forward);
using BackwardInputFn = decltype(&backward_input);
using DropoutFn = decltype(&dropout);

struct Kernels {
  ForwardFn forward;
  BackwardInputFn backward_input;
  DropoutFn dropout;
};

namespace generic {
extern const Kernels kernels;
}
namespace avx2 {
extern const Kernels kernels;  // x86-64 builds only (FORGE_RT_X86_DISPATCH)
}

extern std::atomic<int64_t> g_transient;  // last_transient_bytes(), written by either build

}  // namespace forge_qlora
