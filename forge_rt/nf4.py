"""NF4 / FP4 blockwise 4-bit weights, byte-compatible with bitsandbytes 0.50.

Layout (bitsandbytes'): elements in row-major order, two per byte with the first in the HIGH nibble;
one fp32 absmax per `blocksize` elements; optional double quantization of absmax (8-bit dynamic
code, blocks of 256, after subtracting the mean absmax). The 4-bit work runs in C++ (csrc/nf4) on
CPU tensors; the small absmax double quantization runs in torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from forge_rt.core.native import require_native as _require_native
from forge_rt.core.errors import ForgeError

QUANT_TYPES = {"nf4": 0, "fp4": 1}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_SRC_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class NF4Error(ForgeError, ValueError):
    """Bad input to the NF4 quantizer (the message names the field and the fix)."""


@dataclass
class NF4Weight:
    packed: torch.Tensor  # uint8 [ceil(numel/2)]
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] when double-quantized
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(n_blocks/256)]
    nested_code: torch.Tensor | None = None  # fp32 [256]
    offset: float | None = None
    _absmax_cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        # Validated once, here: every kernel reads these buffers by raw pointer, so a wrong size would
        # read out of bounds rather than fail.
        self.shape = torch.Size(self.shape)
        n = self.shape.numel()
        if self.quant_type not in QUANT_TYPES:
            raise NF4Error(f"NF4Weight: quant_type {self.quant_type!r} is not supported (use 'nf4' or 'fp4')")
        if self.blocksize not in BLOCKSIZES:
            raise NF4Error(f"NF4Weight: blocksize {self.blocksize} is not one of {BLOCKSIZES}")
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1:
            raise NF4Error(f"NF4Weight: packed must be a 1-D uint8 tensor, got {self.packed.dtype} "
                           f"{tuple(self.packed.shape)}")
        if self.packed.numel() != (n + 1) // 2:
            raise NF4Error(f"NF4Weight {tuple(self.shape)}: packed has {self.packed.numel()} bytes, needs {(n + 1) // 2}")
        n_blocks = -(-n // self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise NF4Error(f"NF4Weight {tuple(self.shape)}: absmax has {self.absmax.numel()} entries; blocks of "
                           f"{self.blocksize} need {n_blocks}")
        if self.nested_absmax is None:
            if self.absmax.dtype != torch.float32:
                raise NF4Error(f"NF4Weight: absmax is {self.absmax.dtype}; without nested_absmax it must be float32 "
                               "(a uint8 absmax needs nested_absmax, nested_code and offset)")
            return
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        if (self.absmax.dtype != torch.uint8 or self.nested_code is None or self.nested_code.numel() != 256
                or self.offset is None or self.nested_absmax.numel() != n_nested):
            raise NF4Error(f"NF4Weight: a double-quantized weight needs a uint8 absmax, {n_nested} nested_absmax "
                           f"values, a 256-entry nested_code and an offset; got absmax {self.absmax.dtype}, "
                           f"{self.nested_absmax.numel()} nested_absmax, nested_code "
                           f"{None if self.nested_code is None else self.nested_code.numel()}, offset {self.offset}")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def code(self) -> torch.Tensor:
        """fp32 [16] code book of `quant_type`, indexed by the 4-bit code."""
        return _code(self.quant_type).to(self.packed.device)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block fp32 absmax, resolving double quantization (cached)."""
        if not self.double_quant:
            return self.absmax
        if self._absmax_cache is None or self._absmax_cache.device != self.absmax.device:
            nested = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
            # Two separate fp32 roundings, as bitsandbytes (dequantize_blockwise, then += offset).
            scaled = self.nested_code.to(self.absmax.device)[self.absmax.long()] * nested
            self._absmax_cache = scaled + torch.tensor(self.offset, dtype=torch.float32, device=scaled.device)
        return self._absmax_cache

    def to(self, device) -> "NF4Weight":
        """A copy on `device` (same format)."""
        move = (lambda t: None if t is None else t.to(device))
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         self.quant_type, move(self.nested_absmax), move(self.nested_code), self.offset)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "NF4Weight":
        """View a bitsandbytes Params4bit (or packed tensor) + QuantState as an NF4Weight, sharing storage
        (a copy for bitsandbytes' CPU-packed layout)."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise NF4Error("from_bnb: no QuantState given and the weight has no .quant_state; pass the "
                           "bitsandbytes QuantState of this Params4bit (module.weight.quant_state)")
        if qs.quant_type not in QUANT_TYPES:
            raise NF4Error(f"from_bnb: quant_type {qs.quant_type!r} is not supported; forge_rt reads "
                           f"{' and '.join(QUANT_TYPES)} 4-bit weights")
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if data.dtype != torch.uint8:  # quant_storage other than uint8: same bytes
            data = data.view(torch.uint8)
        if getattr(qs, "packing_format_for_cpu", False):
            return _from_cpu_packed(data, qs)
        shape = torch.Size(qs.shape)
        if data.numel() != -(-shape.numel() // 2):
            raise NF4Error(f"from_bnb: packed weight has {data.numel()} bytes but QuantState.shape "
                           f"{tuple(shape)} needs {-(-shape.numel() // 2)}; pass the matching QuantState")
        if qs.nested:
            if qs.state2.blocksize != NESTED_BLOCKSIZE:
                raise NF4Error(f"from_bnb: nested blocksize {qs.state2.blocksize} is not supported (only 256)")
            return cls(data.view(-1), qs.absmax, shape, qs.dtype, qs.blocksize, qs.quant_type,
                       qs.state2.absmax, qs.state2.code, float(qs.offset))
        return cls(data.view(-1), qs.absmax, shape, qs.dtype, qs.blocksize, qs.quant_type)

    def to_bnb(self):
        """(packed [ceil(n/2), 1] uint8, bitsandbytes QuantState), sharing storage with this weight."""
        from bitsandbytes.functional import QuantState

        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
            offset = torch.tensor(self.offset, dtype=torch.float32, device=self.absmax.device)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=self.code(), blocksize=self.blocksize,
                        quant_type=self.quant_type, dtype=self.dtype, offset=offset, state2=state2)
        return self.packed.view(-1, 1), qs


@lru_cache(maxsize=None)
def _code(quant_type: str) -> torch.Tensor:
    mod = _require_native()
    qt = QUANT_TYPES[quant_type]
    return torch.tensor([mod.nf4_code_value(q, qt) for q in range(16)], dtype=torch.float32)


@lru_cache(maxsize=None)
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted fp32 values): for each of 7 decades,
    evenly spaced fraction means of the decade, both signs, plus 0 and 1."""
    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (i - 6)  # multiplied in fp32, as bitsandbytes does
        values += (scale * means).tolist() + ((-scale) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    """65536-entry table from a quantized position in [-1, 1] to the nearest dynamic code (lower code on
    a tie), the way bitsandbytes' CPU quantize_blockwise builds it."""
    code = dynamic_code()
    mids = 0.5 * (code[:-1] + code[1:])
    size = 65536
    vals = -1.0 + (2.0 * torch.arange(size, dtype=torch.float32)) / (size - 1)
    return torch.searchsorted(mids, vals, side="left").to(torch.uint8)


def _quantize_absmax(absmax: torch.Tensor):
    """Double quantization: (uint8 codes, fp32 nested absmax per 256 blocks, offset)."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = (-n) % NESTED_BLOCKSIZE
    blocks = torch.nn.functional.pad(centred, (0, pad)).view(-1, NESTED_BLOCKSIZE)
    nested = blocks.abs().amax(dim=1)
    inv = 1.0 / torch.where(nested == 0, torch.ones_like(nested), nested)
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    # Separate fp32 roundings, as bitsandbytes' C code: ((v + 1) * 0.5) * 65535 + 0.5, truncated.
    pos = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    q = _dynamic_lut()[pos]
    q[nested == 0] = 0  # an all-equal block (e.g. a single block) codes as 0
    return q.view(-1)[:n].contiguous(), nested, offset.item()


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise NF4Error(f"quantize: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _SRC_TYPES:
        raise NF4Error(f"quantize: weight dtype {weight.dtype} is not supported; convert it to "
                       "float32, float16 or bfloat16 first")
    if weight.dim() == 0 or weight.numel() == 0:
        raise NF4Error(f"quantize: weight of shape {tuple(weight.shape)} has no elements to quantize")


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
             quant_type: str = "nf4") -> NF4Weight:
    """Blockwise 4-bit quantization of `weight` (any shape, fp32/fp16/bf16), bitsandbytes' bytes."""
    _check_weight(weight)
    if quant_type not in QUANT_TYPES:
        raise NF4Error(f"quantize: quant_type {quant_type!r} is not supported; use 'nf4' or 'fp4'")
    if blocksize not in BLOCKSIZES:
        raise NF4Error(f"quantize: blocksize {blocksize} is not supported; use one of {BLOCKSIZES}")
    src = weight.detach()
    device = src.device
    src = src.to("cpu").contiguous()  # the quantizer is C++; a GPU weight comes back to its device
    n = src.numel()
    packed = torch.empty(-(-n // 2), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    bad = _require_native().nf4_quantize(src.data_ptr(), _SRC_TYPES[src.dtype], n, blocksize,
                                         QUANT_TYPES[quant_type], packed.data_ptr(), absmax.data_ptr())
    if bad:
        raise NF4Error(f"quantize: weight of shape {tuple(weight.shape)} contains {bad} NaN/inf values; "
                       "fix the checkpoint before quantizing")
    w = NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize, quant_type)
    if double_quant:
        q, nested, offset = _quantize_absmax(absmax)
        w = NF4Weight(packed, q, weight.shape, weight.dtype, blocksize, quant_type, nested,
                      dynamic_code().clone(), offset)
    return w.to(device) if device.type != "cpu" else w


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight (shape `w.shape`, dtype `dtype` or the original dtype), decoded by the
    C++ (CPU) or CUDA code of forge_rt._C. `forge_rt.ops.dequantize` is the same decode dispatched over
    every backend (reference, Triton) by forge_rt.core.backend.select."""
    dtype = dtype or w.dtype
    packed = w.packed.contiguous()
    n = w.numel
    absmax = w.absmax_fp32().contiguous()
    qt = QUANT_TYPES[w.quant_type]
    if packed.is_cuda:
        out = torch.empty(n, dtype=torch.float32, device=packed.device)
        stream = torch.cuda.current_stream(packed.device).cuda_stream
        _require_native().nf4_dequantize_cuda(packed.data_ptr(), absmax.data_ptr(), n, w.blocksize, qt,
                                              out.data_ptr(), stream)
    else:
        out = torch.empty(n, dtype=torch.float32)
        _require_native().nf4_dequantize(packed.data_ptr(), absmax.data_ptr(), n, w.blocksize, qt, out.data_ptr())
    return out.view(w.shape).to(dtype)


def _from_cpu_packed(data: torch.Tensor, qs) -> NF4Weight:
    """A plain-NF4 copy of a weight bitsandbytes repacked for its AVX512-BF16 CPU kernel (it does so in place
    on a Linear4bit's first eval forward: QuantState.packing_format_for_cpu).

    That layout (bitsandbytes.functional._convert_weight_packed_for_cpu, block_n 32) holds, for each block
    of 32 rows and each pair of columns, 32 bytes: element 2*b+j of the 64 codes (row b, column j of the pair)
    in the low nibble of byte i = 2*b+j for b < 16, in the high nibble of byte i - 32 for b >= 16. Its absmax
    is bf16 [K / blocksize, N] (double quantization resolved, then rounded to bf16); this copy uses those
    values, as bitsandbytes' kernel does."""
    N, K = (int(d) for d in qs.shape)
    if len(qs.shape) != 2 or N % 32 or K % 2 or K % qs.blocksize or data.numel() != N * K // 2:
        raise NF4Error(f"unexpected CPU-packed weight {tuple(data.shape)} for shape {tuple(qs.shape)}")
    groups = data.reshape(N // 32, K // 2, 32)
    codes = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # [N/32, K/2, 64]: 32 rows x 2 columns
    codes = codes.view(N // 32, K // 2, 32, 2).permute(0, 2, 1, 3).reshape(-1, 2)  # row-major pairs
    packed = (codes[:, 0] << 4) | codes[:, 1]  # bitsandbytes' plain layout: first element high
    absmax = qs.absmax.T.reshape(-1).float()
    dtype = getattr(qs, "original_dtype", torch.float32)
    return NF4Weight(packed.contiguous(), absmax, torch.Size((N, K)), dtype, qs.blocksize, qs.quant_type)
