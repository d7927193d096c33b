"""NF4 decoding in Triton: the per-element decode shared by the fused kernels, and a dequantize kernel.

Reads the bitsandbytes layout of `forge_rt.nf4.NF4Weight` as is: flat element i of the (N, K) weight
sits in byte i // 2, in the HIGH nibble when i is even; its scale is absmax[i // blocksize]. A
double-quantized absmax (uint8 codes into `nested_code`, scaled per 256 blocks by `nested_absmax`,
plus `offset`) is resolved inside the kernel, so no fp32 copy of the scales is ever made.

Triton decides at import whether kernels run compiled or in the interpreter: set TRITON_INTERPRET=1
before importing this module to run it on CPU tensors."""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from forge_rt.core.backend import FLOAT_DTYPES
from forge_rt.nf4 import NESTED_BLOCKSIZE



@triton.jit
def nf4_codes(packed_ptr, code_ptr, idx, mask):
    """Code-book values (fp32) of the weight elements at flat indices `idx` (any shape)."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    shift = ((1 - idx % 2) * 4).to(tl.int32)  # even element -> high nibble
    return tl.load(code_ptr + ((byte >> shift) & 0xF))


@triton.jit
def nf4_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
               DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of the quantization blocks `block` (any shape), double quantization resolved."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
             row, k, k0, row_mask, k_mask, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
             NESTED_BLOCKSIZE: tl.constexpr, ROW_SCALE: tl.constexpr):
    """fp32 weight values at flat indices row + k, 0 where masked off. `row` (flat index of each row's
    first element) and `k` (columns, starting at k0) broadcast to the tile. ROW_SCALE: each row's
    stretch of this tile lies in one quantization block, so one scale per row is loaded."""
    mask = row_mask & k_mask
    idx = row + k
    if ROW_SCALE:
        scale = nf4_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, (row + k0) // BLOCKSIZE,
                           row_mask, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    else:
        scale = nf4_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, idx // BLOCKSIZE, mask,
                           DOUBLE_QUANT, NESTED_BLOCKSIZE)
    return tl.where(mask, nf4_codes(packed_ptr, code_ptr, idx, mask) * scale, 0.0)


def scale_args(w) -> tuple:
    """(absmax, nested_absmax, nested_code, offset, double_quant) for `nf4_scales`; unused pointers
    repeat `absmax` so every launch has the same signature."""
    device = w.packed.device
    if w.nested_absmax is None:  # NF4Weight validated the absmax dtypes and sizes
        absmax = _on(w.absmax, device)
        return absmax, absmax, absmax, 0.0, False
    return (_on(w.absmax, device), _on(w.nested_absmax, device).float(), _on(w.nested_code, device).float(),
            float(w.offset), True)


_codes: dict[tuple[str, str], torch.Tensor] = {}


def code_on(w) -> torch.Tensor:
    """The fp32 [16] code book of `w.quant_type` on the device of `w.packed` (copied there once)."""
    key = (w.quant_type, str(w.packed.device))
    if key not in _codes:
        _codes[key] = w.code().to(device=w.packed.device, dtype=torch.float32).contiguous()
    return _codes[key]


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device).contiguous()


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr,
                       numel, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    value = nf4_codes(packed_ptr, code_ptr, idx, mask) * nf4_scales(
        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, idx // BLOCKSIZE, mask, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(w, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight of `w` (shape `w.shape`) in `dtype` (default: the weight's original dtype), on the
    device of `w.packed`. Values are code[nibble] * absmax in fp32, then cast, as bitsandbytes does."""
    dtype = dtype or w.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    out = torch.empty(tuple(w.shape), dtype=dtype, device=w.packed.device)
    numel = out.numel()
    if numel == 0:
        return out
    absmax, nested_absmax, nested_code, offset, dq = scale_args(w)
    block = 1024
    _dequantize_kernel[(triton.cdiv(numel, block),)](
        w.packed, absmax, code_on(w), nested_absmax, nested_code, offset, out, numel,
        BLOCKSIZE=w.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, BLOCK=block)
    return out
