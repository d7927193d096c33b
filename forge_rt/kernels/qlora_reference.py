"""PyTorch oracle of the fused 4-bit LoRA linear: dequantize the whole weight in torch (nf4_reference,
no native code), then plain matmuls in fp32. Slow and memory-hungry by design; it is what the other
backends are checked against."""
from __future__ import annotations

import torch

from forge_rt.kernels import nf4_reference
from forge_rt.kernels.dropout_reference import dropout  # noqa: F401  (this backend's dropout kernel)


def _weight(w, device: torch.device) -> torch.Tensor:
    return nf4_reference.dequantize(w, torch.float32).to(device)


def forward(x, w, xa, B, scaling: float, bias):
    y = x.float() @ _weight(w, x.device).T
    if bias is not None:
        y = y + bias.float()
    if xa is not None and B is not None:
        y = y + scaling * (xa.float() @ B.float().T)
    return y.to(x.dtype)


def backward_input(g, w, gb, A, scaling: float):
    gx = g.float() @ _weight(w, g.device)
    if gb is not None and A is not None:
        gx = gx + scaling * (gb.float() @ A.float())
    return gx.to(g.dtype)
