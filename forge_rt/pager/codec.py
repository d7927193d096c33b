"""Tensor-level wrapper of the native paging codec (bit-shuffle + nvCOMP LZ4 per 64 KiB chunk).

A tensor becomes one or more blobs (pieces), each a 1-D uint8 tensor in the layout of
csrc/paging/blob_hd.h. fp32 tensors whose low 16 bits are all zero (bf16 values upcast by RMSNorm,
softmax, logits) are stored as their high halves.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from forge_rt.core.native import require_native
from forge_rt.core.errors import ForgeError


class PagingError(ForgeError, RuntimeError):
    """A paged tensor could not be stored or restored; the message names the tensor and the fix."""


@dataclass
class Encoded:
    pieces: list[torch.Tensor]  # uint8 blobs, one per `piece_bytes` of the tensor
    half: bool

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.pieces)


class TensorCodec:
    """Encodes contiguous CPU tensors into blobs and back.

    The native codec probes one chunk to pick the byte planes worth LZ4 (or to skip a tensor that
    does not shrink by min_ratio). Tensors of one `kind` (the op that saved them, shape, dtype) have
    alike statistics step after step, so the choice is remembered per kind and re-probed every
    `reprobe` uses rather than probed on every save.

    A tensor is encoded in pieces of `piece_bytes`, each its own blob, so the native scratch stays
    small and warm: a big tensor (logits) in one piece would need fresh scratch of twice its size.
    Measurements: bench/results/NOTES.md.
    """

    def __init__(self, threads: int | None = None, level: int = 1, chunk_bytes: int = 65536,
                 min_ratio: float = 1.05, reprobe: int = 16, piece_bytes: int = 8 << 20):
        if not 0 <= level <= 12:
            raise ValueError(f"paging codec level={level}: use 0-12 (1 is fast; nvCOMP's default 9 is ~20x slower)")
        native = require_native().paging
        if not getattr(native, "available", False):
            raise PagingError("this forge_rt._C was built without nvCOMP; reinstall with the "
                              "nvidia-libnvcomp-cu12 wheel present so the paging codec is compiled")
        self._native = native
        self.threads = threads or min(2, os.cpu_count() or 1)
        self.min_ratio = min_ratio
        self.reprobe = reprobe
        self.piece_bytes = piece_bytes
        self._codec = native.Codec(self.threads, level, chunk_bytes)
        self._lock = threading.Lock()  # compress() fills one scratch area per codec
        self._planes: dict = {}  # kind -> [lz4 plane mask (0: skip the tensor), uses left]

    def encode(self, flat: torch.Tensor, kind=None) -> Encoded | None:
        """Compresses a contiguous CPU tensor, or returns None when its probe chunk does not shrink."""
        half = flat.dtype == torch.float32 and self._native.fp32_low16_zero(flat.data_ptr(), flat.numel())
        step = max(1, self.piece_bytes // flat.element_size())
        with self._lock:
            known = self._planes.get((kind, half)) if kind is not None else None
            if known is not None and known[1] > 0:
                known[1] -= 1
                planes = known[0]
            else:
                planes = self._probe(flat[flat.numel() // step // 2 * step:][:step], half)
                if kind is not None:
                    self._planes[(kind, half)] = [planes, self.reprobe]
            if planes == 0:
                return None
            pieces = []
            for start in range(0, max(flat.numel(), 1), step):
                piece = flat[start:start + step]
                n = self._codec.compress(piece.data_ptr(), piece.numel() * piece.element_size(), piece.element_size(),
                                         half, self.min_ratio, planes)
                blob = torch.empty(n, dtype=torch.uint8)
                self._codec.take(blob.data_ptr())
                pieces.append(blob)
        return Encoded(pieces, half)

    def _probe(self, piece: torch.Tensor, half: bool) -> int:
        """The byte planes worth LZ4 for tensors like `piece`, or 0 when it does not shrink by min_ratio."""
        return self._codec.probe(piece.data_ptr(), piece.numel() * piece.element_size(), piece.element_size(), half,
                                 self.min_ratio)

    def decode(self, pieces: list[torch.Tensor], out: torch.Tensor, half: bool, name: str) -> None:
        """Fills the contiguous tensor `out` from its pieces; raises PagingError naming `name` if corrupt."""
        flat = out.view(-1)
        step = max(1, self.piece_bytes // out.element_size())
        if len(pieces) != max(1, -(-flat.numel() // step)):
            raise PagingError(f"paged tensor {name} has {len(pieces)} stored pieces where its size needs "
                              f"{-(-flat.numel() // step)}; its record is corrupt, so backward cannot use it")
        for i, blob in enumerate(pieces):
            part = flat[i * step:(i + 1) * step]
            try:
                self._codec.decompress(blob.data_ptr(), blob.numel(), part.data_ptr(),
                                       part.numel() * part.element_size(), part.element_size(), half)
            except self._native.CodecError as exc:
                where = f" (piece {i} of {len(pieces)})" if len(pieces) > 1 else ""
                raise PagingError(f"paged tensor {name} failed its integrity check on restore{where} ({exc}); "
                                  "its stored copy is corrupt, so backward cannot use it. Check the memory "
                                  "or disk holding the spill file and rerun the step.") from None
