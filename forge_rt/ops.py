"""Fused 4-bit LoRA linear as an autograd op:

    qlora_linear(x, W, A, B, s, bias, dropout) = x @ dequant(W)^T + bias + s * (dropout(x) @ A^T) @ B^T

W (an `forge_rt.nf4.NF4Weight`) is frozen. Backward returns grads for x, A, B and bias and saves only
what it needs: x (for grad A), x @ A^T (for grad B) and a dropout seed (the mask is regenerated), never a
dequantized W. The two matmuls with W run in a backend kernel (forge_rt/kernels); the rank-r LoRA
products stay in torch."""
from __future__ import annotations

import torch

from forge_rt import backend
from forge_rt.kernels import QLORA_BACKENDS, qlora_kernels
from forge_rt.nf4 import NF4Weight


def dropout_seed() -> int:
    """A dropout seed taken from torch's global generator, so torch.manual_seed makes dropout repeatable."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """Keep-mask (bool) of inverted dropout with drop probability p; the same seed gives the same mask."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def _dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return x * dropout_mask(x.shape, p, seed, x.device) / (1.0 - p)


def _check(x, w, lora_A, lora_B, bias, dropout) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in backend.FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"qlora_linear: x must be a float32/float16/bfloat16 tensor, got {got}")
    if not isinstance(w, NF4Weight):  # an NF4Weight validated its own buffers when it was built
        raise TypeError(f"qlora_linear: w_nf4 must be a forge_rt.nf4.NF4Weight, got {type(w).__name__}; "
                        "build one with forge_rt.nf4.quantize(weight) or NF4Weight.from_bnb(...)")
    N, K = int(w.shape[0]), int(w.shape[1])
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"qlora_linear: x has shape {tuple(x.shape)}, but the NF4 weight is "
                         f"[{N}, {K}] (out, in): x's last dim must be {K}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("qlora_linear: pass both lora_A and lora_B, or neither (plain NF4 linear)")
    if lora_A is not None:
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor) or t.dtype not in backend.FLOAT_DTYPES or t.dim() != 2:
                raise TypeError(f"qlora_linear: {name} must be a 2-D float tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        r = lora_A.shape[0]
        if lora_A.shape[1] != K or tuple(lora_B.shape) != (N, r):
            raise ValueError(f"qlora_linear: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} "
                             f"must be [r, {K}] and [{N}, r] for an NF4 weight of [{N}, {K}]")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype not in backend.FLOAT_DTYPES
                             or tuple(bias.shape) != (N,)):
        raise ValueError(f"qlora_linear: bias must be a float tensor of shape ({N},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    for name, t in (("w_nf4.packed", w.packed), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"qlora_linear: {name} is on {t.device} but x is on {x.device}; move them together")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"qlora_linear: dropout must be in [0, 1), got {dropout}")


class _QLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, lora_A, lora_B, bias, scaling, dropout, kernels):
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K).contiguous()
        seed = dropout_seed() if lora_A is not None and dropout > 0 else None
        xa = None
        if lora_A is not None:
            xd = _dropout(x2, dropout, seed) if seed is not None else x2
            xa = xd.to(lora_A.dtype) @ lora_A.T
        y = kernels.forward(x2, w, xa, lora_B, scaling, bias)
        ctx.w, ctx.scaling, ctx.dropout, ctx.seed, ctx.kernels = w, scaling, dropout, seed, kernels
        ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
        need_A = lora_A is not None and ctx.needs_input_grad[2]
        need_B = lora_A is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(x2 if need_A else None, xa if need_B else None, lora_A, lora_B)
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, xa, lora_A, lora_B = ctx.saved_tensors
        s, p, seed, kern = ctx.scaling, ctx.dropout, ctx.seed, ctx.kernels
        g2 = gy.reshape(-1, gy.shape[-1]).contiguous()
        gb = g2.to(lora_B.dtype) @ lora_B if lora_B is not None else None
        grad_x = grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            if gb is not None and seed is None:  # LoRA grad fused into the kernel's epilogue
                gx = kern.backward_input(g2, ctx.w, gb, lora_A, s)
            else:
                gx = kern.backward_input(g2, ctx.w, None, None, s)
                if gb is not None:  # dropout sits between x and A: the LoRA grad goes through the mask
                    gx = gx + _dropout((s * gb) @ lora_A, p, seed).to(gx.dtype)
            grad_x = gx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            xd = _dropout(x2, p, seed) if seed is not None else x2
            grad_A = ((s * gb).T @ xd.to(gb.dtype)).to(lora_A.dtype)
        if ctx.needs_input_grad[3]:
            grad_B = (s * (g2.to(xa.dtype).T @ xa)).to(lora_B.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_A, grad_B, grad_bias, None, None, None


def qlora_linear(x: torch.Tensor, w_nf4, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                 scaling: float, bias: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """x[..., K] -> [..., N] = x @ dequant(w_nf4)^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T.

    w_nf4: NF4Weight of shape (N, K), frozen. lora_A [r, K] and lora_B [N, r], or both None for a plain
    NF4 linear. dropout: LoRA dropout probability; pass 0 in eval mode (the op applies it whenever > 0).
    Any leading batch dims; non-contiguous inputs are copied. The output has x's dtype. The backend is
    chosen by forge_rt.backend.select (FORGE_RT_BACKEND=reference|cpu|triton overrides)."""
    _check(x, w_nf4, lora_A, lora_B, bias, float(dropout))
    kernels = qlora_kernels(backend.select(x, QLORA_BACKENDS))
    return _QLoRALinear.apply(x, w_nf4, lora_A, lora_B, bias, float(scaling), float(dropout), kernels)
