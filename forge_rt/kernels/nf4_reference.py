"""PyTorch oracle of NF4/FP4 dequantization, independent of the native code: the code books are written
out here (the QLoRA paper's NF4 values and bitsandbytes' FP4 values), nibbles are unpacked in torch.
Slow by design; the C++, CUDA and Triton decoders are checked against it."""
from __future__ import annotations

import torch

# Index = the 4-bit code. NF4: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit), scaled so the largest magnitude is 1.
FP4_CODE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                    -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def code(quant_type: str) -> torch.Tensor:
    return torch.tensor(CODES[quant_type], dtype=torch.float32)


def dequantize(w, dtype: torch.dtype | None = None) -> torch.Tensor:
    """code[nibble] * absmax in fp32 (first element in the high nibble), then cast, as bitsandbytes does."""
    n = w.numel
    packed = w.packed.reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    absmax = w.absmax_fp32().to(packed.device).repeat_interleave(w.blocksize)[:n]
    out = code(w.quant_type).to(packed.device)[nibbles] * absmax
    return out.view(w.shape).to(dtype or w.dtype)
