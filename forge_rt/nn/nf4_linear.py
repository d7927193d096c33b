"""forge_rt's 4-bit linear module and the model swap that installs it.

`quantize_model` turns a model's nn.Linear layers into `NF4Linear` (no bitsandbytes needed). NF4Linear
is an nn.Linear subclass, so PEFT's stock LoRA dispatcher wraps it with a plain `get_peft_model`.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from forge_rt import nf4
from forge_rt.ops import qlora_linear

log = logging.getLogger("forge_rt")


class NF4Linear(nn.Linear):
    """A frozen NF4 linear layer. `weight` holds the packed bytes (uint8, bitsandbytes layout) so
    `.to(device)` moves them; `nf4` is the NF4Weight read by the kernels."""

    def __init__(self, weight: nf4.NF4Weight, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a full-precision weight
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out_features, in_features) weight, got {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.nf4 = weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> "NF4Linear":
        w = nf4.quantize(linear.weight.data, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        return cls(w, linear.bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Keep the NF4Weight on the packed bytes' device; its absmax stays fp32 whatever dtype `fn` casts to.
        packed = self.weight.data
        if packed.data_ptr() != self.nf4.packed.data_ptr():
            moved = self.nf4.to(packed.device)
            moved.packed = packed
            self.nf4 = moved
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self.nf4, None, None, 0.0, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.nf4.quant_type}, blocksize={self.nf4.blocksize}, "
                f"double_quant={self.nf4.double_quant}")


def _skipped(name: str, skip) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts for s in skip)


def quantize_model(model: nn.Module, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True,
                   quant_type: str = "nf4") -> nn.Module:
    """Replace every nn.Linear (except names or name components in `skip`) by an NF4Linear, in place.

    The model is flagged `is_loaded_in_4bit`, as bitsandbytes models are, so PEFT treats it as one
    (prepare_model_for_kbit_training enables gradient checkpointing). GPT-2-style Conv1D layers (transposed
    weights) are neither quantized nor fused: a warning says so."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and not _skipped(name, skip)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(mod, blocksize, double_quant, quant_type))
    conv1d = [name for name, mod in model.named_modules() if type(mod).__name__ == "Conv1D"]
    if conv1d:
        warnings.warn(f"forge_rt.quantize_model: {len(conv1d)} Conv1D layers (GPT-2 style, e.g. {conv1d[0]}) are "
                      "left in full precision and are not fused by accelerate; forge_rt quantizes and fuses "
                      "nn.Linear layers only", UserWarning, stacklevel=2)
    model.is_loaded_in_4bit = True
    log.info("forge_rt.quantize_model: %d linear layers -> NF4 (%s, blocksize %d, double quant %s)",
             len(targets), quant_type, blocksize, double_quant)
    return model
