"""What a pack hook returns for a paged tensor: enough to rebuild it (dtype, shape, strides) and its
bytes, in memory (raw or compressed pieces) or, once spilled, nowhere here (the disk tier has them by
key). The autograd graph owns it, so it dies with the graph; the Pager learns of that through a
weakref.finalize, not through the record, which knows nothing of the Pager."""
from __future__ import annotations

import torch


class PagedRecord:
    __slots__ = ("key", "name", "dtype", "shape", "stride", "contiguous", "nbytes", "half", "blob", "raw", "lens",
                 "__weakref__")

    def __init__(self, key: int, t: torch.Tensor, op: str | None):
        self.key = key
        self.name = f"#{key} ({op or 'leaf'}, {str(t.dtype)[6:]}{list(t.shape)})"
        self.dtype, self.shape, self.stride = t.dtype, t.shape, t.stride()
        self.contiguous = t.is_contiguous()
        self.nbytes = t.numel() * t.element_size()
        self.half, self.raw, self.blob = False, True, None
        self.lens: list[int] = []  # byte length of each piece of a compressed blob

    def resident_bytes(self) -> int:
        if self.blob is None:
            return 0
        return sum(self.lens) if not self.raw else self.blob.numel() * self.blob.element_size()

    def pieces(self) -> list[torch.Tensor]:
        """The bytes to write: the blob's compressed pieces, or the raw tensor's bytes in logical order."""
        if not self.raw:
            return self.blob
        t = self.blob.contiguous().view(-1)
        return [t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)]
