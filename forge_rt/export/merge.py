"""Folding LoRA adapters into plain linears: `merge(model, dtype)`.

Each LoRA layer becomes an nn.Linear holding dequant(W) + scaling * B @ A (+ bias); a 4-bit base
(forge_rt NF4Linear or bitsandbytes Linear4bit) that carries no adapter is dequantized too. Layers are
merged one at a time in fp32 and cast at once, so only one layer's fp32 copy exists beyond the model."""
from __future__ import annotations

import torch
from torch import nn

from forge_rt.core.errors import ForgeError
from forge_rt.nf4 import NF4Weight
from forge_rt.nn import NF4Linear
from forge_rt.ops import dequantize


class MergeError(ForgeError, ValueError):
    pass


def _bnb_linear4bit():
    try:
        import bitsandbytes as bnb
        return bnb.nn.Linear4bit
    except ImportError:
        return None


def _is_4bit(layer: nn.Module) -> bool:
    bnb4 = _bnb_linear4bit()
    return isinstance(layer, NF4Linear) or (bnb4 is not None and isinstance(layer, bnb4))


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as fp32 (out, in)."""
    if isinstance(base, NF4Linear):  # after a PEFT merge the weight holds dense values its NF4 bytes don't describe
        dense = base.weight.dense
        return dense.float() if dense is not None else dequantize(base.nf4, torch.float32)
    if _is_4bit(base):  # bitsandbytes: decoded by forge_rt (bnb's own CPU dequant is wrong on short rows)
        return dequantize(NF4Weight.from_bnb(base.weight, base.weight.quant_state), torch.float32)
    if type(base) is not nn.Linear:
        raise MergeError(f"cannot merge into a {type(base).__name__} base layer (only nn.Linear, NF4Linear, "
                         f"bitsandbytes Linear4bit)")
    return base.weight.detach().float()


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return out


def _active(layer, adapters: bool) -> list[str]:
    if not adapters or layer.disable_adapters:
        return []
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    for name in names:
        if layer.use_dora.get(name, False) or name in getattr(layer, "lora_variant", {}):
            raise MergeError(f"adapter {name!r} is DoRA or another LoRA variant: merge supports plain LoRA only")
    return names


def _merged_weight(layer, adapters: bool = True) -> torch.Tensor:
    """fp32 dequant(W) + scaling * B @ A of a LoRA layer (its base untouched)."""
    weight = _base_weight(layer.get_base_layer())
    for name in _active(layer, adapters):
        weight = weight + layer.get_delta_weight(name).float()  # a new tensor: the base stays intact
    return weight


def _merged_bias(layer, adapters: bool = True) -> torch.Tensor | None:
    base = layer.get_base_layer()
    bias = None if base.bias is None else base.bias.detach().float()
    for name in _active(layer, adapters):
        lb = layer.lora_B[name].bias
        if lb is not None:  # PEFT's lora_bias: B's bias is added unscaled
            bias = lb.detach().float() if bias is None else bias + lb.detach().float()
    return bias


def _merged_lora(layer, dtype: torch.dtype) -> nn.Linear:
    return _plain_linear(_merged_weight(layer), _merged_bias(layer), dtype)


def lazy_weights(model: nn.Module, adapters: bool = True) -> dict:
    """HF parameter name -> (shape, fn giving its fp32 value), as merge() would leave them, without merging:
    each LoRA layer is folded (or, `adapters` False, its base decoded) only when its fn is called, so an
    exporter holds one layer's fp32 copy at a time. `model` is left as it is."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    out, skip = {}, None
    for name, module in inner.named_modules():
        if skip is not None and name.startswith(skip):
            continue  # inside a layer already taken whole (pre-order: its subtree follows it)
        pre = name + "." if name else ""
        if isinstance(module, LoraLayer) or _is_4bit(module):
            base = module.get_base_layer() if isinstance(module, LoraLayer) else module
            lora = isinstance(module, LoraLayer)
            out[pre + "weight"] = ((base.out_features, base.in_features), (lambda m=module: _merged_weight(m, adapters))
                                   if lora else (lambda m=module: _base_weight(m)))
            if base.bias is not None or (lora and _merged_bias(module, adapters) is not None):
                out[pre + "bias"] = ((base.out_features,), (lambda m=module: _merged_bias(m, adapters))
                                     if lora else (lambda b=base.bias: b.detach().float()))
            skip = pre
            continue
        for key, p in module._parameters.items():
            if p is not None:
                out[pre + key] = (tuple(p.shape), lambda p=p: p.detach().float())
    return out


def merge(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The plain transformers model with every active LoRA adapter folded in and every 4-bit linear
    dequantized, all weights in `dtype`. Works in place on `model` (a PeftModel or a model holding
    LoRA layers); the PEFT wrapper is dropped."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MergeError(f"merge dtype must be float32, bfloat16 or float16, not {dtype}")
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    for name, module in list(inner.named_modules()):
        if isinstance(module, LoraLayer):
            new = _merged_lora(module, dtype)
        elif _is_4bit(module) and not name.endswith(".base_layer"):  # base layers go with their LoRA layer
            new = _plain_linear(_base_weight(module), module.bias, dtype)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent) if parent else inner, child, new)
    for attr in ("peft_config", "forge_rt_summary"):
        inner.__dict__.pop(attr, None)
    return inner.to(dtype).eval()

