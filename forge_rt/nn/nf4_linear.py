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
from forge_rt.nn.nf4_tensor import NF4Tensor
from forge_rt.ops import qlora_linear

log = logging.getLogger("forge_rt")


class NF4Linear(nn.Linear):
    """A frozen NF4 linear layer. `weight` is an NF4Tensor: logical (out, in) shape and float dtype over
    bitsandbytes' bytes, so PEFT code that reads an nn.Linear's weight (merge, DoRA, OLoRA) works and
    `.to(device)` moves the bytes; `nf4` is the NF4Weight read by the kernels. The state dict holds the
    packed bytes (uint8) under `weight`, as before. Once an in-place op made the weight dense (a PEFT
    merge), the layer computes a plain F.linear with those exact values."""

    def __init__(self, weight: nf4.NF4Weight, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a full-precision weight
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out_features, in_features) weight, got {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(NF4Tensor(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def nf4(self) -> nf4.NF4Weight:
        return self.weight.nf4

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> "NF4Linear":
        w = nf4.quantize(linear.weight.data, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        return cls(w, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dense is not None:
            return nn.functional.linear(x, self.weight.dense.to(x.dtype),
                                        None if self.bias is None else self.bias.to(x.dtype))
        return qlora_linear(x, self.nf4, None, None, 0.0, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        destination[prefix + "weight"] = w.packed if w.dense is None else w.dense

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the packed bytes go into the NF4 weight; full-precision values (a merged layer) make it dense
        saved = state_dict.get(prefix + "weight")
        if saved is not None:
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
            with torch.no_grad():
                target = self.weight.packed if saved.dtype == torch.uint8 else self.weight
                if target.shape != saved.shape:
                    error_msgs.append(f"size mismatch for {prefix}weight: {tuple(saved.shape)} in the checkpoint, "
                                      f"{tuple(target.shape)} here")
                else:
                    target.copy_(saved)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, [], unexpected_keys, error_msgs)
        missing_keys.extend(k for k in [prefix + "bias"] if self.bias is not None and k not in state_dict)

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
