"""Counter-based LoRA dropout in torch integer ops: the oracle of csrc/qlora/dropout_hd.h and the path of
devices without a native kernel. Element i of a tensor (row-major) is kept iff

    bits(i) = mix32(mix32(mix32(lo(i)) ^ k0) + (hi(i) ^ k1) mod 2^32)  >=  threshold(p) = floor(p * 2^32)

with (k0, k1) the seed's low and high 32-bit words, lo/hi the index's and mix32 Wellons' "lowbias32";
the output is x * (keep ? 1 / (1 - p) : 0) in fp32 (so a dropped inf gives nan, as in torch's dropout). The mask depends only on (seed, shape), so the forward and the backward
regenerate the same one on any backend."""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x < 2^32 in int64, split in 16-bit halves of c so no product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keys(seed: int) -> tuple[int, int]:
    return seed & _M32, (seed >> 32) & _M32


def threshold(p: float) -> int:
    return min(int(p * 2**32), _M32)


def scale(p: float) -> float:
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def bits(i: torch.Tensor, seed: int) -> torch.Tensor:
    """The 32 random bits (int64 holding a uint32) of the elements at the int64 indices `i`."""
    k0, k1 = keys(seed)
    return _mix32((_mix32(_mix32(i & _M32) ^ k0) + ((i >> 32) ^ k1)) & _M32)


def keep_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """Bool keep-mask of `shape` (True = kept)."""
    i = torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64, device=device)
    return (bits(i, seed) >= threshold(p)).reshape(shape)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with the elements of keep_mask dropped and the rest scaled by 1 / (1 - p), in x's dtype."""
    multiplier = keep_mask(x.shape, p, seed, x.device).float() * scale(p)
    return (x.float() * multiplier).to(x.dtype)
