"""nvCOMP's GPU LZ4 through forge_rt._C.paging.cuda_* (csrc/paging/paging_cuda.cu): one CUDA tensor to one
device blob (bit-shuffled chunks, CRC-32C each) and back, on the current stream. Not wired into the pager: that
waits for a GPU run proving it bit-exact (tools/gpu_check.sh runs tests/gpu)."""
from __future__ import annotations

import torch

from forge_rt.core.native import native
from forge_rt.pager.codec import PagingError

CHUNK_BYTES = 65536


def available() -> bool:
    mod = native()
    return mod is not None and getattr(mod.paging, "cuda", False) and torch.cuda.is_available()


def _scratch(nbytes: int, width: int, device) -> torch.Tensor:
    return torch.empty(native().paging.cuda_compress_scratch_bytes(nbytes, width, CHUNK_BYTES), dtype=torch.uint8,
                       device=device)


def compress(t: torch.Tensor) -> torch.Tensor:
    """The blob of the contiguous CUDA tensor `t` (reading its size waits for the stream)."""
    p, nbytes, width = native().paging, t.numel() * t.element_size(), t.element_size()
    scratch = _scratch(nbytes, width, t.device)
    blob = torch.empty(p.cuda_blob_bound(nbytes, CHUNK_BYTES), dtype=torch.uint8, device=t.device)
    size = torch.zeros(1, dtype=torch.int64, device=t.device)
    rc = p.cuda_compress(t.data_ptr(), nbytes, width, CHUNK_BYTES, scratch.data_ptr(), scratch.numel(),
                         blob.data_ptr(), size.data_ptr(), torch.cuda.current_stream(t.device).cuda_stream)
    if rc:
        raise PagingError(f"GPU LZ4 compress failed (CUDA/nvCOMP status {rc})")
    return blob[: int(size.item())]


def decompress(blob: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fills the contiguous CUDA tensor `out` from `blob`; raises PagingError on a bad chunk."""
    p, nbytes, width = native().paging, out.numel() * out.element_size(), out.element_size()
    scratch = _scratch(nbytes, width, out.device)
    bad = torch.full((1,), -1, dtype=torch.int32, device=out.device)
    rc = p.cuda_decompress(blob.data_ptr(), blob.numel(), -(-nbytes // CHUNK_BYTES), out.data_ptr(), nbytes, width,
                           CHUNK_BYTES, scratch.data_ptr(), scratch.numel(), bad.data_ptr(),
                           torch.cuda.current_stream(out.device).cuda_stream)
    if rc or int(bad.item()) != -1:
        raise PagingError(f"GPU LZ4 decompress failed (status {rc}, first bad chunk {int(bad.item())})")
    return out
