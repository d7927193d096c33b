"""Patching other people's PEFT models: `accelerate` routes the forward of each LoRA layer over a 4-bit
base (bitsandbytes Linear4bit or forge_rt's NF4Linear) through `forge_rt.ops.qlora_linear`, in place and
reversibly: only the layer's `forward` attribute changes, so parameter names and saved adapters stay
the same."""
from __future__ import annotations

import logging
import types
import weakref
from collections import Counter

import torch
from torch import nn

from forge_rt import nf4
from forge_rt.nn.nf4_linear import NF4Linear
from forge_rt.ops import qlora_linear

log = logging.getLogger("forge_rt")

_bnb_views: "weakref.WeakKeyDictionary[nn.Module, tuple[int, nf4.NF4Weight]]" = weakref.WeakKeyDictionary()


def _bnb_linear4bit():
    try:
        import bitsandbytes as bnb
        return bnb.nn.Linear4bit
    except ImportError:
        return None


def _nf4_of(base: nn.Module) -> nf4.NF4Weight:
    """The NF4Weight of a 4-bit base layer (bitsandbytes layers are viewed without copying, cached)."""
    if isinstance(base, NF4Linear):
        return base.nf4
    ptr = base.weight.data_ptr()
    cached = _bnb_views.get(base)
    if cached is None or cached[0] != ptr:
        cached = (ptr, nf4.NF4Weight.from_bnb(base.weight, base.weight.quant_state))
        _bnb_views[base] = cached
    return cached[1]


def _static_reason(layer: nn.Module) -> str | None:
    """Why a tuner layer can't take the fused path at all (None if it can)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        return f"non-LoRA adapter ({type(layer).__name__})"
    base = layer.get_base_layer()
    bnb4 = _bnb_linear4bit()
    if not (isinstance(base, NF4Linear) or (bnb4 is not None and isinstance(base, bnb4))):
        return f"base layer is not 4-bit ({type(base).__name__})"
    if bnb4 is not None and isinstance(base, bnb4):
        qs = getattr(base.weight, "quant_state", None)
        if qs is None or qs.quant_type not in nf4.QUANT_TYPES:
            return "bitsandbytes layer not quantized to nf4/fp4"
    return None


def _adapter_reason(layer: nn.Module) -> str | None:
    """Why the layer's adapter setup can't be fused (None if it can)."""
    if layer.merged:
        return "merged adapter"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return "multiple active adapters" if active else "no active LoRA adapter"
    name = active[0]
    if layer.use_dora.get(name, False):
        return "DoRA"
    if name in getattr(layer, "lora_variant", {}):
        return f"LoRA variant ({type(layer.lora_variant[name]).__name__})"
    if layer.lora_B[name].bias is not None:
        return "LoRA bias"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # The adapter setup can change between calls (disable_adapter(), set_adapter, merge): re-check.
    if args or kwargs.get("adapter_names") is not None or self.disable_adapters or _adapter_reason(self):
        return type(self).forward(self, x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.lora_A)
    base = self.get_base_layer()
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return qlora_linear(x, _nf4_of(base), self.lora_A[name].weight, self.lora_B[name].weight,
                        self.scaling[name], base.bias, dropout=p)


def _is_fused(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ is _fused_forward


def accelerate(model: nn.Module, enable: bool = True, chunked_loss: bool = False) -> nn.Module:
    """Route each LoRA layer over a 4-bit base through forge_rt's fused qlora_linear (in place).

    enable=False restores PEFT's stock forward everywhere. Layers that can't be fused (other adapter
    types, DoRA and other LoRA variants, several active adapters, merged) keep the stock path and are
    counted. The summary dict is logged and attached as `model.forge_rt_summary`. chunked_loss=True
    (opt-in: `logits` is then None whenever labels are given) also patches the causal LM so its loss
    runs the LM head only where labels are, a chunk at a time (forge_rt.nn.lm_loss)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    accelerated, skipped = 0, Counter()
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not enable:
            if _is_fused(module):
                del module.forward
            continue
        reason = _static_reason(module) or _adapter_reason(module)
        if reason is None:
            if not _is_fused(module):
                module.forward = types.MethodType(_fused_forward, module)
            accelerated += 1
        else:
            if _is_fused(module):
                del module.forward
            skipped[reason] += 1
    if chunked_loss or not enable:
        from forge_rt.nn.lm_loss import patch_causal_lm_loss
        _patch_loss(model, patch_causal_lm_loss, enable and chunked_loss)
    summary = {"enabled": enable, "accelerated": accelerated, "skipped": dict(skipped)}
    if enable:
        detail = ", ".join(f"{n} {r}" for r, n in skipped.items()) or "none"
        log.info("forge_rt.accelerate: %d LoRA layers fused; kept on the stock path: %s", accelerated, detail)
    else:
        log.info("forge_rt.accelerate: fused path disabled, stock PEFT forward restored")
    model.forge_rt_summary = summary
    return model


def _patch_loss(model: nn.Module, patch, enable: bool) -> None:
    try:
        patch(model, enable=enable)
    except (TypeError, ValueError):
        if enable:  # not a causal LM this can patch: say so instead of silently keeping full logits
            raise
