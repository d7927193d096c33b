"""Triton backend of the fused 4-bit LoRA linear (see forge_rt/kernels/qlora_reference.py for the math).

forward:         y  = x @ dequant(W).T + bias + scaling * xa @ B.T
backward_input:  gx = g @ dequant(W)   + scaling * gb @ A

Each is one kernel: NF4 is decoded tile by tile inside the reduction loop (never a full-precision W;
backward reads W^T from the same packed bytes by indexing, no transposed copy), fp32 accumulation,
the LoRA term and bias in the epilogue, output in x's dtype. A double-quantized absmax is decoded in
the kernel too (see nf4_triton). The LoRA product runs in the dtype of xa / gb (ops/qlora.py computes them
in the adapter's dtype, often fp32 under an fp16/bf16 base model), reducing the rank in chunks of a
power of two >= 16 (tl.dot's minimum) with masks, so any rank works.

Tile sizes are a fixed heuristic: they have not been tuned on a GPU (none was available)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge_rt.core.backend import FLOAT_DTYPES
# LoRA dropout on GPUs: the torch ops of the reference (the same mask as every backend)
from forge_rt.kernels.dropout_reference import dropout  # noqa: F401,E402
from forge_rt.kernels.nf4_triton import code_on, nf4_tile, scale_args
from forge_rt.nf4 import NESTED_BLOCKSIZE


@triton.jit
def _rank_r_product(l_ptr, slm, slr, r_ptr, srr, src, offs_m, offs_c, in_m, in_c, R,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """fp32 tile of L[M, R] @ Rm[R, C] (the LoRA epilogue), R walked in BLOCK_R chunks, in L's dtype."""
    out = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        lt = tl.load(l_ptr + offs_m[:, None] * slm + offs_r[None, :] * slr, mask=in_m[:, None] & in_r[None, :], other=0.0)
        rt = tl.load(r_ptr + offs_r[:, None] * srr + offs_c[None, :] * src, mask=in_r[:, None] & in_c[None, :], other=0.0)
        out = tl.dot(lt, rt.to(lt.dtype), out, input_precision=PRECISION)
    return out


@triton.jit
def _forward_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                    xa_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R, scaling,
                    sxm, sxk, sam, sar, sbn, sbr, sym, syn,
                    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    ROW_SCALE: tl.constexpr, WIDE_INDEX: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    row = (offs_n.to(tl.int64) if WIDE_INDEX else offs_n) * K  # flat index of W[n, 0]
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        # W^T tile [BLOCK_K, BLOCK_N]
        wt = nf4_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                      row[None, :], offs_k[:, None], k0, in_n[None, :], in_k[:, None],
                      BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, ROW_SCALE)
        acc = tl.dot(x, wt.to(dt), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:  # + scaling * xa @ B^T
        acc += scaling * _rank_r_product(xa_ptr, sam, sar, b_ptr, sbr, sbn, offs_m, offs_n, in_m, in_n, R,
                                         LORA_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _backward_input_kernel(g_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                           gb_ptr, a_ptr, gx_ptr, M, N, K, R, scaling,
                           sgm, sgn, sbm, sbr, sar, sak, sxm, sxk,
                           BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                           ROW_SCALE: tl.constexpr, WIDE_INDEX: tl.constexpr, HAS_LORA: tl.constexpr,
                           PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_k = offs_k < K
    k0 = tl.program_id(1) * BLOCK_K
    dt = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * sgm + offs_n[None, :] * sgn,
                    mask=in_m[:, None] & in_n[None, :], other=0.0)
        # W tile [BLOCK_N, BLOCK_K], straight from the packed (N, K) bytes
        row = (offs_n.to(tl.int64) if WIDE_INDEX else offs_n) * K
        w = nf4_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                     row[:, None], offs_k[None, :], k0, in_n[:, None], in_k[None, :],
                     BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, ROW_SCALE)
        acc = tl.dot(g, w.to(dt), acc, input_precision=PRECISION)
    if HAS_LORA:  # + scaling * gb @ A
        acc += scaling * _rank_r_product(gb_ptr, sbm, sbr, a_ptr, sar, sak, offs_m, offs_k, in_m, in_k, R,
                                         LORA_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    tl.store(gx_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk, acc.to(gx_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_k[None, :])


def forward(x: torch.Tensor, w, xa: torch.Tensor | None, B: torch.Tensor | None, scaling: float,
            bias: torch.Tensor | None) -> torch.Tensor:
    """y[M, N] = x @ dequant(w).T + bias + scaling * xa @ B.T, in x's dtype (xa: [M, r], B: [N, r])."""
    n, k = _check_weight_on(w, x)
    m = _check_2d("x", x, k, "in_features")
    lora = _check_lora("xa", xa, "B", B, m, n, x)
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be [{n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    r = xa.shape[1] if lora else 0
    _check_extent(m, n, k, r)
    bias = bias.contiguous() if bias is not None else None
    xa_, b_ = (xa, B) if lora else (x, x)  # placeholders when there is no LoRA term
    absmax, nested_absmax, nested_code, offset, dq = scale_args(w)
    bm, bn, bk, br, warps = _tiles(m, r, x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _forward_kernel[grid](
        x, w.packed, absmax, code_on(w), nested_absmax, nested_code, offset,
        xa_, b_, bias if bias is not None else x, y, m, n, k, r, float(scaling),
        x.stride(0), x.stride(1), xa_.stride(0), xa_.stride(1), b_.stride(0), b_.stride(1),
        y.stride(0), y.stride(1),
        BLOCKSIZE=w.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
        ROW_SCALE=_row_scale(k, w.blocksize, bk), WIDE_INDEX=_wide(n, k), HAS_LORA=lora, HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype), LORA_PRECISION=_precision(xa_.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=warps, num_stages=3)
    return y


def backward_input(g: torch.Tensor, w, gb: torch.Tensor | None, A: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """gx[M, K] = g @ dequant(w) + scaling * gb @ A, in g's dtype (gb: [M, r], A: [r, K])."""
    n, k = _check_weight_on(w, g)
    m = _check_2d("g", g, n, "out_features")
    lora = _check_lora("gb", gb, "A", A, m, k, g, b_is_r_by_n=True)
    gx = torch.empty((m, k), dtype=g.dtype, device=g.device)
    if m == 0 or k == 0:
        return gx
    r = gb.shape[1] if lora else 0
    _check_extent(m, n, k, r)
    gb_, a_ = (gb, A) if lora else (g, g)
    absmax, nested_absmax, nested_code, offset, dq = scale_args(w)
    bm, bn, bk, br, warps = _tiles(m, r, g.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _backward_input_kernel[grid](
        g, w.packed, absmax, code_on(w), nested_absmax, nested_code, offset,
        gb_, a_, gx, m, n, k, r, float(scaling),
        g.stride(0), g.stride(1), gb_.stride(0), gb_.stride(1), a_.stride(0), a_.stride(1),
        gx.stride(0), gx.stride(1),
        BLOCKSIZE=w.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
        ROW_SCALE=_row_scale(k, w.blocksize, bk), WIDE_INDEX=_wide(n, k), HAS_LORA=lora,
        PRECISION=_precision(g.dtype), LORA_PRECISION=_precision(gb_.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=warps, num_stages=3)
    return gx


def _tiles(m: int, r: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps). tl.dot needs every side >= 16; small M (decode)
    gets a thin M tile. Chosen so the sm_80/87/90 builds don't spill registers (tests/triton_aot_compile.py):
    fp32 products take far more registers, hence its small tiles. Not timed: no GPU here."""
    br = min(64, max(16, triton.next_power_of_2(max(r, 1))))
    if dtype == torch.float32:
        return (16 if m <= 16 else 32), 32, 32, br, 4
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return bm, 64, 64, br, 4 if bm == 16 else 8


def _row_scale(k: int, blocksize: int, block_k: int) -> bool:
    """Rows start on a quantization block and a K tile never straddles one: one scale per row and tile."""
    return k % blocksize == 0 and blocksize % block_k == 0


def _wide(n: int, k: int) -> bool:
    """int64 flat indices only when int32 could overflow (masked lanes reach a tile past the last row)."""
    return (n + 256) * k >= 2**31


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands get IEEE products unless torch itself allows TF32 for fp32
    matmuls (as the reference would); 16-bit operands keep Triton's default, which doesn't affect them."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _check_weight_on(w, like: torch.Tensor) -> tuple[int, int]:
    if len(w.shape) != 2:
        raise ValueError(f"the NF4 weight of a linear layer must be 2-D (out_features, in_features), "
                         f"got shape {tuple(w.shape)}")
    if w.packed.device != like.device:
        raise ValueError(f"NF4 weight is on {w.packed.device} but the input is on {like.device}; move one of them")
    return tuple(w.shape)


def _check_extent(m: int, n: int, k: int, r: int) -> None:
    """Activations are indexed in int32 (the weight switches to int64 when it must)."""
    if m * max(n, k, r) >= 2**31:
        raise ValueError(f"a [{m}, {max(n, k, r)}] activation has 2**31 elements or more, beyond the "
                         "Triton kernel's int32 indexing; split the batch into smaller chunks")


def _check_2d(name: str, t: torch.Tensor, cols: int, what: str) -> int:
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must be 2-D [M, {cols}] ({what} of the NF4 weight), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t.shape[0]


def _check_lora(a_name: str, a: torch.Tensor | None, b_name: str, b: torch.Tensor | None, m: int, n: int,
                like: torch.Tensor, b_is_r_by_n: bool = False) -> bool:
    """Validates the LoRA pair: a [m, r] and b [n, r] (or [r, n]), both or neither; True when present."""
    if (a is None) != (b is None):
        raise ValueError(f"pass both {a_name} and {b_name} for the LoRA term, or neither")
    if a is None:
        return False
    b_shape = tuple(reversed(b.shape)) if b_is_r_by_n else tuple(b.shape)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != m or b_shape[0] != n or a.shape[1] != b_shape[1] \
            or a.shape[1] == 0:
        want_b = f"[r, {n}]" if b_is_r_by_n else f"[{n}, r]"
        raise ValueError(f"LoRA shapes don't fit: {a_name} must be [{m}, r] and {b_name} {want_b} with the same "
                         f"r >= 1; got {a_name} {tuple(a.shape)}, {b_name} {tuple(b.shape)}")
    for name, t in ((a_name, a), (b_name, b)):
        if t.dtype not in FLOAT_DTYPES or t.device != like.device:
            raise ValueError(f"{name} must be a float tensor on {like.device}, got {t.dtype} on {t.device}")
    return True
