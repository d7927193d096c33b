"""Triton backend of the fused linear + cross-entropy (math: linear_ce_reference; the chunk loop and its
memory budget: linear_ce_torch.run_chunks).

Per chunk of tokens the logits GEMM runs in torch (cuBLAS) in the model's dtype, as the stock HF head
does. One Triton program per row then walks the row's vocab tiles twice, in fp32: an online max /
sum-exp for the logsumexp (plus the target logit), then grad_scale * (softmax - onehot) * dcap/dz is
written over the logits in place. The gradient GEMMs run in torch again, so a chunk holds a single
[chunk, V] buffer in the input's dtype.

Tile sizes are a fixed heuristic: they have not been tuned on a GPU (none was available)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge_rt.kernels.linear_ce_torch import chunk_rows, run_chunks

BLOCK_V_MAX = 2048  # vocab tile: 8 warps x 32 lanes hold 8 fp32 values each per live tile


@triton.jit
def _tanh(x):
    """exp form (libdevice's tanh doesn't run in the interpreter); exact at +-inf, abs. error ~1 ulp of 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _ce_rows_kernel(z_ptr, labels_ptr, loss_ptr, V, stride, softcap, grad_scale,
                    SOFTCAP: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride
    label = tl.load(labels_ptr + row)
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        in_v = offs < V
        c = tl.load(base + offs, mask=in_v, other=0.0).to(tl.float32)
        if SOFTCAP:
            c = softcap * _tanh(c / softcap)
        c = tl.where(in_v, c, float("-inf"))  # after the cap: a capped -inf would be -cap
        m_new = tl.maximum(m, tl.max(c, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    target = tl.load(base + label).to(tl.float32)
    if SOFTCAP:
        target = softcap * _tanh(target / softcap)
    tl.store(loss_ptr + row, lse - target)
    if WANT_GRAD:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            in_v = offs < V
            z = tl.load(base + offs, mask=in_v, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = _tanh(z / softcap)
                g = tl.exp(softcap * t - lse) - tl.where(offs == label, 1.0, 0.0)
                g = g * (1.0 - t * t)
            else:
                g = tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)
            tl.store(base + offs, (g * grad_scale).to(z_ptr.dtype.element_ty), mask=in_v)


def _rows(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None, grad_scale: float,
          want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear_ce_torch.RowKernel: the gradient is written over `logits`."""
    c, v = logits.shape
    losses = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _ce_rows_kernel[(c,)](logits, labels, losses, v, logits.stride(0), float(softcap or 1.0),
                              float(grad_scale), SOFTCAP=softcap is not None, WANT_GRAD=want_grad,
                              BLOCK_V=min(BLOCK_V_MAX, triton.next_power_of_2(v)), num_warps=8)
    return losses, logits if want_grad else None


def loss_and_grads(hidden, weight, labels, bias, *, softcap, grad_scale, needs, chunk_tokens=None):
    """Same contract as linear_ce_torch.loss_and_grads; hidden, weight and bias share one dtype, which the
    GEMMs run in (grad_weight of a 16-bit weight accumulates across chunks in that dtype)."""
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"linear_ce triton: hidden, weight and bias must share a dtype, got {hidden.dtype}, "
                         f"{weight.dtype}, {None if bias is None else bias.dtype}")
    rows = chunk_rows(weight.shape[0], weight.element_size(), chunk_tokens)
    return run_chunks(hidden, weight, labels, bias, softcap=softcap, grad_scale=grad_scale, needs=needs,
                      rows=rows, compute_dtype=weight.dtype, row_kernel=_rows)
