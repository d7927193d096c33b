"""PyTorch oracle of the fused linear + cross-entropy: the whole [N, V] logits in fp32, then
torch.nn.functional.cross_entropy. Memory-hungry by design; it is what the other backends are checked
against (see forge_rt.ops.linear_cross_entropy for the contract)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loss(hidden, weight, labels, bias=None, *, ignore_index: int = -100, reduction: str = "mean",
         softcap: float | None = None) -> torch.Tensor:
    """Differentiable fp32 loss of logits = hidden @ weight.T + bias (softcapped: cap * tanh(logits / cap))."""
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def loss_and_grads(hidden, weight, labels, bias, *, softcap, grad_scale, needs, chunk_tokens=None):
    """The backend kernel (see linear_ce_torch.loss_and_grads) by autograd through `loss`."""
    leaves = [t.detach().requires_grad_(need) if t is not None else None
              for t, need in zip((hidden, weight, bias), needs)]
    with torch.enable_grad():
        total = loss(*leaves[:2], labels, leaves[2], reduction="sum", softcap=softcap)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(total * grad_scale, wanted) if wanted else ())
    return (total.detach(), *(next(grads).to(t.dtype) if t is not None and t.requires_grad else None
                              for t in leaves))
