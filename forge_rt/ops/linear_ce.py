"""Fused LM head + cross-entropy: the loss of `hidden @ weight^T (+ bias)` against labels, computed in
chunks of tokens so the [tokens, vocab] logits never exist whole. The backend is chosen by
forge_rt.core.backend.select (kernels/linear_ce_*)."""
from __future__ import annotations

import importlib  # kernel modules load on first use: a missing Triton only matters to the triton backend

import torch

from forge_rt.core import backend

LINEAR_CE_BACKENDS = ("reference", "cpu", "triton")
_LINEAR_CE_MODULES = {"reference": "linear_ce_reference", "cpu": "linear_ce_torch", "triton": "linear_ce_triton"}


def _check_linear_ce(hidden, weight, labels, bias, ignore_index, reduction, softcap, chunk_tokens) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in backend.FLOAT_DTYPES or hidden.dim() == 0:
        raise TypeError("linear_cross_entropy: hidden must be a float32/float16/bfloat16 tensor [..., H], got "
                        f"{getattr(hidden, 'dtype', type(hidden).__name__)} {tuple(getattr(hidden, 'shape', ()))}")
    H = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != H \
            or weight.dtype not in backend.FLOAT_DTYPES:
        raise ValueError(f"linear_cross_entropy: weight must be a float tensor [V, {H}] (out, in) for hidden of "
                         f"shape {tuple(hidden.shape)}, got {getattr(weight, 'dtype', type(weight).__name__)} "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    V = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,)
                             or bias.dtype not in backend.FLOAT_DTYPES):
        raise ValueError(f"linear_cross_entropy: bias must be a float tensor of shape ({V},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor of shape "
                         f"{tuple(hidden.shape[:-1])} (hidden's leading dims), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but hidden is on {hidden.device}; "
                             "move them together")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be None or > 0, got {softcap}")
    if chunk_tokens is not None and not int(chunk_tokens) >= 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be None or >= 1, got {chunk_tokens}")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, softcap, chunk_tokens, kernels, grad_mode):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        keep = (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)  # rows that reach the LM head
        targets = labels.reshape(-1).index_select(0, keep).long()
        n, V = keep.numel(), weight.shape[0]
        if n and not bool(((targets >= 0) & (targets < V)).all()):
            bad = targets[(targets < 0) | (targets >= V)][0].item()
            raise ValueError(f"linear_cross_entropy: label {bad} is outside [0, {V}) and is not "
                             f"ignore_index ({ignore_index})")
        # mean over zero targets is 0/0 = nan, as in torch's cross_entropy (whose grads are then 0)
        scale = 1.0 / n if reduction == "mean" and n else 1.0
        # needs_input_grad follows requires_grad, not the caller's grad mode (forward itself always runs without
        # grad): under the caller's no_grad no gradient is computed at all
        grad = grad_mode
        needs = (grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1],
                 grad and bias is not None and ctx.needs_input_grad[3])
        total, gh, gw, gb = kernels.loss_and_grads(h2.index_select(0, keep), weight, targets, bias, softcap=softcap,
                                                   grad_scale=scale, needs=needs, chunk_tokens=chunk_tokens)
        ctx.h_shape, ctx.h_dtype = hidden.shape, hidden.dtype
        ctx.save_for_backward(keep, gh, gw, gb)
        return total / n if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        keep, gh, gw, gb = ctx.saved_tensors
        grad_h = None
        if gh is not None:
            grad_h = torch.zeros((ctx.h_shape.numel() // ctx.h_shape[-1], ctx.h_shape[-1]), dtype=ctx.h_dtype,
                                 device=gh.device)
            grad_h.index_copy_(0, keep, gh * go)
            grad_h = grad_h.reshape(ctx.h_shape)
        scaled = lambda g: None if g is None else g * go  # noqa: E731
        return grad_h, scaled(gw), None, scaled(gb), None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                         softcap: float | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """cross_entropy(logits, labels) with logits = hidden @ weight^T + bias, never holding all the logits.

    hidden [..., H] (fp32/fp16/bf16), weight [V, H], bias [V] or None, labels: integers of hidden's
    leading shape, each in [0, V) or ignore_index. softcap: logits become softcap * tanh(logits / softcap)
    (Gemma 2's final_logit_softcapping). Returns a 0-d fp32 loss: "sum" or "mean" over the labelled rows,
    the same value as torch.nn.functional.cross_entropy on the fp32 logits (a mean over no labelled row is
    nan, as there; its grads are zero).

    Only labelled rows reach the LM head. They are gathered and pushed through it chunk_tokens at a time
    (default: as many as keep one chunk's [rows, V] buffers within linear_ce_torch.CHUNK_BUDGET_BYTES), and
    each chunk's logits are turned into their gradient straight away (softmax - onehot, Liger's scheme), so
    forward computes the grads: backward only scales them by the incoming grad. Saved for backward: the
    labelled rows' indices, grad_hidden of those rows [n, H] in hidden's dtype, and grad_weight [V, H] /
    grad_bias [V] in their dtypes, only when those require grad. Peak extra memory: one chunk's buffers,
    the gathered rows and their grad [n, H], grad_weight when wanted, and (cpu backend, 16-bit weight) an
    fp32 copy of the weight: the cpu backend computes in fp32, the triton one in the inputs' dtype (which
    hidden, weight and bias must then share). Not twice differentiable.
    Backend by forge_rt.core.backend.select: cpu (chunked torch), triton (CUDA), reference (full logits)."""

    _check_linear_ce(hidden, weight, labels, bias, ignore_index, reduction, softcap, chunk_tokens)
    name = backend.select(hidden, LINEAR_CE_BACKENDS)
    kernels = importlib.import_module(f"forge_rt.kernels.{_LINEAR_CE_MODULES[name]}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, bias, int(ignore_index), reduction,
                                     None if softcap is None else float(softcap),
                                     None if chunk_tokens is None else int(chunk_tokens), kernels,
                                     torch.is_grad_enabled())
