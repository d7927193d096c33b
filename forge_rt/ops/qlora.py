"""Fused 4-bit LoRA linear as an autograd op:

    qlora_linear(x, W, A, B, s, bias, dropout) = x @ dequant(W)^T + bias + s * (dropout(x) @ A^T) @ B^T

W (an `forge_rt.nf4.NF4Weight`) is frozen. Backward returns grads for x, A, B and bias and saves only
what it needs: x (for grad A), x @ A^T (for grad B) and a dropout seed (the mask is a counter hash of the
seed, regenerated), never a dequantized W. The two matmuls with W run in a backend kernel (forge_rt/kernels); the rank-r LoRA
products stay in torch."""
from __future__ import annotations

import torch

from forge_rt.core import backend
from forge_rt.kernels import QLORA_BACKENDS, dropout_reference, qlora_kernels
from forge_rt.nf4 import NF4Weight


def dropout_seed() -> int:
    """A dropout seed taken from torch's global generator, so torch.manual_seed makes dropout repeatable."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """Keep-mask (bool) of inverted dropout with drop probability p: a counter hash of (seed, element index)
    (kernels/dropout_reference.py), so the same seed gives the same mask on every backend and device."""
    return dropout_reference.keep_mask(shape, p, seed, device)


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


# The fused op is a torch.library custom op (fake implementation and autograd registered), so torch.compile
# traces it as one node instead of breaking the graph. An NF4Weight crosses the op boundary as its tensors
# and fields (_W_FIELDS), rebuilt inside; the backend is chosen outside and passed by name.
_W_FIELDS = ("packed", "absmax", "nested_absmax", "nested_code", "shape", "dtype", "blocksize", "quant_type", "offset")


def _w_parts(w: NF4Weight) -> tuple:
    """The weight's fields with double quantization already resolved: `absmax_fp32()` is cached on `w` (the
    layer's weight), while the NF4Weight rebuilt inside the op lives for one call only."""
    return (w.packed, w.absmax_fp32(), None, None, list(w.shape), w.dtype, w.blocksize, w.quant_type, None)


def _weight(packed, absmax, nested_absmax, nested_code, shape, dtype, blocksize, quant_type, offset) -> NF4Weight:
    return NF4Weight(packed, absmax, torch.Size(shape), dtype, blocksize, quant_type, nested_absmax, nested_code,
                     offset)


@torch.library.custom_op("forge_rt::qlora_linear", mutates_args=())
def _qlora_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
              nested_code: torch.Tensor | None, shape: list[int], dtype: torch.dtype, blocksize: int, quant_type: str,
              offset: float | None, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
              bias: torch.Tensor | None, scaling: float, dropout: float, seed: int,
              backend_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa): y as qlora_linear's contract, xa = dropout(x) @ A^T [M, r] (kept for grad B; [M, 0] without
    LoRA). `seed` < 0: no dropout."""
    w = _weight(packed, absmax, nested_absmax, nested_code, shape, dtype, blocksize, quant_type, offset)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xa = x2.new_empty(x2.shape[0], 0)
    if lora_A is not None:
        xd = qlora_kernels(backend_name).dropout(x2, dropout, seed) if seed >= 0 else x2
        xa = xd.to(lora_A.dtype) @ lora_A.T
    y = qlora_kernels(backend_name).forward(x2, w, xa if lora_A is not None else None, lora_B, scaling, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1]), xa


@_qlora_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, shape, dtype, blocksize, quant_type, offset, lora_A, lora_B,
      bias, scaling, dropout, seed, backend_name):
    M = x.numel() // x.shape[-1]
    r = 0 if lora_A is None else lora_A.shape[0]
    return x.new_empty(*x.shape[:-1], shape[0]), x.new_empty(M, r, dtype=x.dtype if lora_A is None else lora_A.dtype)


@torch.library.custom_op("forge_rt::qlora_backward_input", mutates_args=())
def _backward_input_op(g: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                       nested_code: torch.Tensor | None, shape: list[int], dtype: torch.dtype, blocksize: int,
                       quant_type: str, offset: float | None, gb: torch.Tensor | None, lora_A: torch.Tensor | None,
                       scaling: float, backend_name: str) -> torch.Tensor:
    """g[M, N] @ dequant(W) + scaling * gb @ A: [M, K] in g's dtype."""
    w = _weight(packed, absmax, nested_absmax, nested_code, shape, dtype, blocksize, quant_type, offset)
    return qlora_kernels(backend_name).backward_input(g, w, gb, lora_A, scaling)


@_backward_input_op.register_fake
def _(g, packed, absmax, nested_absmax, nested_code, shape, dtype, blocksize, quant_type, offset, gb, lora_A, scaling,
      backend_name):
    return g.new_empty(g.shape[0], shape[1])


def _setup_context(ctx, inputs, output):
    x, *w, lora_A, lora_B, bias, scaling, dropout, seed, backend_name = inputs
    ctx.w, ctx.scaling, ctx.dropout, ctx.seed, ctx.backend = w, scaling, dropout, seed, backend_name
    ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
    i_A, i_B = 1 + len(_W_FIELDS), 2 + len(_W_FIELDS)
    need_A = lora_A is not None and ctx.needs_input_grad[i_A]
    need_B = lora_A is not None and ctx.needs_input_grad[i_B]
    ctx.i_A, ctx.i_B = i_A, i_B
    x2 = x.reshape(-1, x.shape[-1]).contiguous() if need_A else None
    ctx.save_for_backward(x2, output[1] if need_B else None, lora_A, lora_B)


def _backward(ctx, gy, _gxa):
    x2, xa, lora_A, lora_B = ctx.saved_tensors
    s, p, seed = ctx.scaling, ctx.dropout, ctx.seed
    g2 = gy.reshape(-1, gy.shape[-1]).contiguous()
    gb = g2.to(lora_B.dtype) @ lora_B if lora_B is not None else None
    grad_x = grad_A = grad_B = grad_bias = None
    fuse = gb is not None and seed < 0  # LoRA grad fused into the kernel's epilogue
    kernels = qlora_kernels(ctx.backend)
    if ctx.needs_input_grad[0]:
        gx = _backward_input_op(g2, *ctx.w, gb if fuse else None, lora_A if fuse else None, s, ctx.backend)
        if gb is not None and not fuse:  # dropout sits between x and A: the LoRA grad goes through the mask
            gx = gx + kernels.dropout((s * gb) @ lora_A, p, seed).to(gx.dtype)
        grad_x = gx.reshape(ctx.x_shape)
    if ctx.needs_input_grad[ctx.i_A] and lora_A is not None:
        xd = kernels.dropout(x2, p, seed) if seed >= 0 else x2
        grad_A = ((s * gb).T @ xd.to(gb.dtype)).to(lora_A.dtype)
    if ctx.needs_input_grad[ctx.i_B] and lora_B is not None:
        grad_B = (s * (g2.to(xa.dtype).T @ xa)).to(lora_B.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[ctx.i_B + 1]:
        grad_bias = g2.sum(0).to(ctx.bias_dtype)
    return (grad_x, *[None] * len(_W_FIELDS), grad_A, grad_B, grad_bias, None, None, None, None)


_qlora_op.register_autograd(_backward, setup_context=_setup_context)


def qlora_linear(x: torch.Tensor, w_nf4, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                 scaling: float, bias: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """x[..., K] -> [..., N] = x @ dequant(w_nf4)^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T.

    w_nf4: NF4Weight of shape (N, K), frozen. lora_A [r, K] and lora_B [N, r], or both None for a plain
    NF4 linear. dropout: LoRA dropout probability; pass 0 in eval mode (the op applies it whenever > 0).
    Any leading batch dims; non-contiguous inputs are copied. The output has x's dtype. The backend is
    chosen by forge_rt.core.backend.select (FORGE_RT_BACKEND=reference|cpu|triton overrides).

    Backward returns grads for x, A, B and bias and saves only x (for grad A), x @ A^T (for grad B) and a
    dropout seed (the mask is regenerated), never a dequantized W. Registered as the torch.library custom
    op forge_rt::qlora_linear (with forge_rt::qlora_backward_input), so torch.compile keeps it in one graph;
    a dropout > 0 draws its seed with .item(), which breaks the graph there."""
    _check(x, w_nf4, lora_A, lora_B, bias, float(dropout))
    seed = dropout_seed() if lora_A is not None and dropout > 0 else -1
    y, _ = _qlora_op(x, *_w_parts(w_nf4), lora_A, lora_B, bias, float(scaling), float(dropout), seed,
                     _qlora_backend(x.device))
    return y


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing: a compiled graph keeps its choice
def _qlora_backend(device: torch.device) -> str:
    return backend.select(torch.empty(0, device=device), QLORA_BACKENDS)
