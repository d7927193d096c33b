"""Modules and patching (Liger-Kernel's split): `nf4_linear` holds forge_rt's 4-bit module and
`quantize_model`; `peft` patches PEFT LoRA models onto the fused op (`accelerate`)."""
from __future__ import annotations

from forge_rt.nn.nf4_linear import NF4Linear, quantize_model
from forge_rt.nn.peft import accelerate

__all__ = ["NF4Linear", "quantize_model", "accelerate"]
