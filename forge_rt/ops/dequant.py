"""NF4/FP4 dequantization dispatched by backend: the torch oracle (kernels/nf4_reference), Triton
(kernels/nf4_triton), or the C++/CUDA decode that `forge_rt.nf4.dequantize` runs."""
from __future__ import annotations

import torch

from forge_rt import nf4
from forge_rt.core.backend import select


def dequantize(w: nf4.NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight (shape `w.shape`, dtype `dtype` or the original dtype) on w's device."""
    dtype = dtype or w.dtype
    which = select(w.packed, ("reference", "cpu", "triton", "cuda"))
    if which == "triton":
        from forge_rt.kernels import nf4_triton  # needs Triton: imported only when chosen
        return nf4_triton.dequantize(w, dtype)
    if which == "reference":
        from forge_rt.kernels import nf4_reference
        return nf4_reference.dequantize(w, dtype)
    return nf4.dequantize(w, dtype)
