// The fused kernels for AVX2+FMA CPUs, run only where the CPU has both (see qlora_isa.h, cpu_path.h).
#define FORGE_RT_AVX2 1
#include "qlora/qlora_kernels.inc"
