"""Fused 4-bit LoRA linear as an autograd op:

    qlora_linear(x, W, A, B, s, bias, dropout) = x @ dequant(W)^T + bias + s * (dropout(x) @ A^T) @ B^T

W (an `forge_rt.nf4.NF4Weight`) is frozen. Backward returns grads for x, A, B and bias and saves only
what it needs: x (for grad A), x @ A^T (for grad B) and a dropout seed (the mask is a counter hash of the
seed, regenerated), never a dequantized W. The two matmuls with W run in a backend kernel (forge_rt/kernels); the rank-r LoRA
products stay in torch."""
from __future__ import annotations

import torch

from forge_rt import backend
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
    chosen by forge_rt.backend.select (FORGE_RT_BACKEND=reference|cpu|triton overrides).

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


# Fused linear + cross-entropy -------------------------------------------------------------------------

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
    Backend by forge_rt.backend.select: cpu (chunked torch), triton (CUDA), reference (full logits)."""
    import importlib  # kernel modules load on first use: a missing Triton only matters to the triton backend

    _check_linear_ce(hidden, weight, labels, bias, ignore_index, reduction, softcap, chunk_tokens)
    name = backend.select(hidden, LINEAR_CE_BACKENDS)
    kernels = importlib.import_module(f"forge_rt.kernels.{_LINEAR_CE_MODULES[name]}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, bias, int(ignore_index), reduction,
                                     None if softcap is None else float(softcap),
                                     None if chunk_tokens is None else int(chunk_tokens), kernels,
                                     torch.is_grad_enabled())
