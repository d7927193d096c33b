// The fused kernels for any CPU of the build's architecture (see qlora_isa.h).
#include "qlora/qlora_kernels.inc"
