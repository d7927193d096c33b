"""Tensor-level wrapper of the native paging codec (bit-shuffle + nvCOMP LZ4 per 64 KiB chunk).

A blob is a 1-D uint8 tensor in the layout of csrc/paging/blob_hd.h. fp32 tensors whose low 16
bits are all zero (bf16 values upcast by RMSNorm, softmax, logits) are stored as their high halves.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from forge_rt._native import require_native


class PagingError(RuntimeError):
    """A paged tensor could not be stored or restored; the message names the tensor and the fix."""


@dataclass
class Encoded:
    blob: torch.Tensor  # uint8 [n]
    half: bool


class TensorCodec:
    def __init__(self, threads: int | None = None, level: int = 1, chunk_bytes: int = 65536,
                 min_ratio: float = 1.05):
        if not 0 <= level <= 12:
            raise ValueError(f"paging codec level={level}: use 0-12 (1 is fast; nvCOMP's default 9 is ~20x slower)")
        native = require_native().paging
        if not getattr(native, "available", False):
            raise PagingError("this forge_rt._C was built without nvCOMP; reinstall with the "
                              "nvidia-libnvcomp-cu12 wheel present so the paging codec is compiled")
        self._native = native
        self.threads = threads or min(2, os.cpu_count() or 1)
        self.min_ratio = min_ratio
        self._codec = native.Codec(self.threads, level, chunk_bytes)
        self._lock = threading.Lock()  # compress() fills one scratch area per codec

    def encode(self, flat: torch.Tensor) -> Encoded | None:
        """Compresses a contiguous CPU tensor, or returns None when its probe chunk does not shrink."""
        nbytes = flat.numel() * flat.element_size()
        half = flat.dtype == torch.float32 and self._native.fp32_low16_zero(flat.data_ptr(), flat.numel())
        with self._lock:
            n = self._codec.compress(flat.data_ptr(), nbytes, flat.element_size(), half, self.min_ratio)
            if n == 0:
                return None
            blob = torch.empty(n, dtype=torch.uint8)
            self._codec.take(blob.data_ptr())
        return Encoded(blob, half)

    def decode(self, blob: torch.Tensor, out: torch.Tensor, half: bool, name: str) -> None:
        """Fills the contiguous tensor `out` from `blob`; raises PagingError naming `name` if corrupt."""
        try:
            self._codec.decompress(blob.data_ptr(), blob.numel(), out.data_ptr(),
                                   out.numel() * out.element_size(), out.element_size(), half)
        except self._native.CodecError as exc:
            raise PagingError(f"paged tensor {name} failed its integrity check on restore ({exc}); "
                              "its stored copy is corrupt, so backward cannot use it. Check the memory "
                              "or disk holding the spill file and rerun the step.") from None
