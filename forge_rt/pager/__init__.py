"""LZ4-compressed activation paging: `forge_rt.paging(...)` -> Pager (saved-tensor hooks)."""
from forge_rt.pager.codec import PagingError, TensorCodec
from forge_rt.pager.hooks import Pager, paging

__all__ = ["paging", "Pager", "PagingError", "TensorCodec"]
