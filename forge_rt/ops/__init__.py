"""The fused ops, each with its written contract: `qlora_linear` (NF4 base + LoRA, forward and backward),
`linear_cross_entropy` (LM head + loss in token chunks) and `dequantize` (NF4 decode on any backend).
Each dispatches by device to a kernel in forge_rt/kernels (FORGE_RT_BACKEND overrides)."""
from forge_rt.ops.dequant import dequantize
from forge_rt.ops.linear_ce import LINEAR_CE_BACKENDS, linear_cross_entropy
from forge_rt.ops.qlora import dropout_mask, dropout_seed, qlora_linear

__all__ = ["qlora_linear", "linear_cross_entropy", "dequantize", "dropout_mask", "dropout_seed", "LINEAR_CE_BACKENDS"]
