"""`NF4Tensor`: the weight of an NF4Linear as torch and PEFT see it.

A frozen tensor of the logical (out_features, in_features) shape and a float dtype that holds no
full-precision values: it wraps a `forge_rt.nf4.NF4Weight` (bitsandbytes' bytes). Code that reads
`layer.weight` like an nn.Linear's gets what it expects:

- any op that reads its values (PEFT's DoRA weight norm, OLoRA's QR, `weight + delta`, `F.linear`) runs
  on the dequantized weight and returns an ordinary tensor;
- an in-place op (PEFT's merge `weight.data += delta`, unmerge, OLoRA's `-=`, `copy_`) makes it *dense*:
  it keeps the exact full-precision result from then on (`dense`) and its NF4 bytes no longer describe it.
  Merging is exact (no re-quantization, unlike bitsandbytes) at the cost of one full-precision copy of
  each merged layer; quantize the merged model again to get 4-bit layers back;
- `.to(device)` moves the bytes; a dtype cast only changes the dtype of dequantized values (the bytes and
  the fp32 absmax stay as they are);
- aliases (`.data`, `.detach()`) share the NF4 bytes and the dense state, so an in-place op through
  `weight.data` is seen by the layer;
- it pickles, deep-copies and flattens (`__tensor_flatten__`) with its inner tensors.
"""
from __future__ import annotations

import copy

import torch
from torch.utils._pytree import tree_map_only

from forge_rt import nf4, ops

_aten = torch.ops.aten
_ALIASES = (_aten.detach.default, _aten.alias.default)
# NF4Weight's tensors, by the names NF4Tensor exposes them under for __tensor_flatten__
_INNER = ("packed", "absmax", "nested_absmax", "nested_code", "dense")


class _State:
    """What aliases of one NF4Tensor share: the NF4 weight and, once written to, the dense values."""

    def __init__(self, w: nf4.NF4Weight, dense: torch.Tensor | None = None):
        self.nf4, self.dense = w, dense


class NF4Tensor(torch.Tensor):
    @staticmethod
    def __new__(cls, state: _State | nf4.NF4Weight, dtype: torch.dtype | None = None):
        state = state if isinstance(state, _State) else _State(state)
        self = torch.Tensor._make_wrapper_subclass(cls, state.nf4.shape, dtype=dtype or state.nf4.dtype,
                                                   device=state.nf4.packed.device, requires_grad=False)
        self._state = state
        return self

    def __init__(self, state, dtype=None):
        super().__init__()

    @property
    def nf4(self) -> nf4.NF4Weight:
        return self._state.nf4

    @property
    def dense(self) -> torch.Tensor | None:
        """The full-precision values once an in-place op wrote to this weight (else None)."""
        return self._state.dense

    def dequantize(self) -> torch.Tensor:
        """The weight's values as an ordinary tensor of this dtype."""
        if self.dense is not None:
            return self.dense.to(self.dtype)
        return ops.dequantize(self.nf4, self.dtype)

    def __repr__(self):
        w = self.nf4
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"quant_type={w.quant_type}, blocksize={w.blocksize}, dense={self.dense is not None})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], NF4Tensor) else None
        if self is not None and func in _ALIASES:
            return NF4Tensor(self._state, self.dtype)
        if self is not None and func is _aten._to_copy.default:
            return self._moved(kwargs.get("device") or self.device, kwargs.get("dtype") or self.dtype)
        if self is not None and func is _aten.clone.default:
            return NF4Tensor(_State(self.nf4, None if self.dense is None else self.dense.clone()), self.dtype)
        plain_args, plain_kwargs = tree_map_only(NF4Tensor, NF4Tensor.dequantize, (args, kwargs))
        if self is not None and func._schema.is_mutable:  # an in-place write: from now on dense
            dense = plain_args[0]
            func(dense, *plain_args[1:], **plain_kwargs)
            self._state.dense = dense
            return self
        return func(*plain_args, **plain_kwargs)

    def _moved(self, device, dtype) -> "NF4Tensor":
        device = torch.device(device)
        w = self.nf4 if device == self.device else self.nf4.to(device)
        dense = None if self.dense is None else self.dense.to(device, dtype)
        return NF4Tensor(_State(w, dense), dtype)

    # Pickling, deepcopy and flattening: the wrapper has no storage of its own.
    def __reduce_ex__(self, protocol):
        return (_rebuild, (self.nf4, self.dense, self.dtype, getattr(self, "_is_param", False)))

    def __deepcopy__(self, memo):
        new = _rebuild(copy.deepcopy(self.nf4, memo), copy.deepcopy(self.dense, memo), self.dtype,
                       getattr(self, "_is_param", False))
        memo[id(self)] = new
        return new

    def __tensor_flatten__(self):
        inner = [n for n in _INNER if getattr(self, n) is not None]
        w = self.nf4
        return inner, (w.shape, w.dtype, w.blocksize, w.quant_type, w.offset, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, orig_dtype, blocksize, quant_type, offset, dtype = meta
        w = nf4.NF4Weight(inner["packed"], inner["absmax"], shape, orig_dtype, blocksize, quant_type,
                          inner.get("nested_absmax"), inner.get("nested_code"), offset)
        return NF4Tensor(_State(w, inner.get("dense")), dtype)

    packed = property(lambda self: self.nf4.packed)
    absmax = property(lambda self: self.nf4.absmax)
    nested_absmax = property(lambda self: self.nf4.nested_absmax)
    nested_code = property(lambda self: self.nf4.nested_code)

    __torch_function__ = torch._C._disabled_torch_function_impl


def _rebuild(w: nf4.NF4Weight, dense, dtype, is_param: bool) -> NF4Tensor:
    t = NF4Tensor(_State(w, dense), dtype)
    if is_param:  # a Parameter of a tensor subclass is the subclass, marked
        t._is_param = True
    return t
