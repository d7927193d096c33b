"""Patching other people's PEFT models: `accelerate` routes the forward of each LoRA layer over a 4-bit
base (bitsandbytes Linear4bit or forge_rt's NF4Linear) through `forge_rt.ops.qlora_linear`, in place and
reversibly: only the layer's class changes (a run-time subclass, forge_rt.nn._swap), so parameter names
and saved adapters stay the same and the model still pickles and deep-copies. A fused layer re-checks on
every call what could have changed since (adapter setup, hooks, the bitsandbytes weight layout) and takes
PEFT's stock forward when it must, counting why in `stock_calls`."""
from __future__ import annotations

import logging
import weakref
from collections import Counter

import torch
from torch import nn

from forge_rt import nf4
from forge_rt.nn._swap import is_swapped, stock_class, swapped_class
from forge_rt.nn.nf4_linear import NF4Linear
from forge_rt.ops import qlora_linear

log = logging.getLogger("forge_rt")

_bnb_views: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nf4.NF4Weight | str]]" = weakref.WeakKeyDictionary()
# Calls of fused layers that took the stock path at run time, by reason (the static ones are in the summary).
stock_calls: Counter = Counter()


def _bnb_linear4bit():
    try:
        import bitsandbytes as bnb
        return bnb.nn.Linear4bit
    except ImportError:
        return None


def _nf4_of(base: nn.Module) -> nf4.NF4Weight | str:
    """The NF4Weight of a 4-bit base layer, or why its current layout can't be read as NF4.

    bitsandbytes layers are viewed without copying and cached by their data pointer and quant state, which
    are checked on every call: bitsandbytes rewrites a weight in place (e.g. into its CPU layout in an
    eval-mode, no-grad forward on AVX512-BF16 CPUs), and such bytes must never be read as plain NF4."""
    if isinstance(base, NF4Linear):
        return base.nf4 if base.weight.dense is None else "NF4 weight made dense by an in-place write (OLoRA)"
    qs = base.weight.quant_state
    cpu_packed = bool(getattr(qs, "packing_format_for_cpu", False))
    key = (base.weight.data_ptr(), id(qs), cpu_packed, qs.absmax.data_ptr())
    cached = _bnb_views.get(base)
    if cached is None or cached[0] != key:
        try:
            w = nf4.NF4Weight.from_bnb(base.weight, qs)
        except nf4.NF4Error as e:
            log.info("forge_rt.accelerate: %s", e)
            w = "bitsandbytes layout not readable as NF4"
        cached = (key, w)
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


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hasattr(module, "_hf_hook"))


def _call_reason(layer: nn.Module, args, kwargs) -> str | None:
    """Why this call of a fused layer must take the stock path (None if it can be fused). The adapter setup
    can change between calls (disable_adapter(), set_adapter, merge), and hooks can be added: re-checked."""
    if args or kwargs.get("adapter_names") is not None:
        return "extra forward arguments (adapter_names)"
    if layer.disable_adapters:
        return "adapters disabled"
    reason = _adapter_reason(layer)
    if reason:
        return reason
    name = next(a for a in layer.active_adapters if a in layer.lora_A)
    # The fused op reads these modules' weights directly, so their hooks (user hooks, accelerate's offload
    # hooks that load weights) would never run: only the stock forward calls them.
    subs = (layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name])
    if any(_hooked(m) for m in subs) or _global_hooks():
        return "module hooks"
    return None


def _global_hooks() -> bool:
    from torch.nn.modules import module as m
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    stock = type(self)._forge_rt_stock_class
    reason = _call_reason(self, args, kwargs)
    base = self.get_base_layer()
    w = None if reason else _nf4_of(base)
    if isinstance(w, str):
        reason = w
    if reason:
        if not stock_calls[reason]:
            log.info("forge_rt.accelerate: a fused layer takes the stock path: %s", reason)
        stock_calls[reason] += 1
        return stock.forward(self, x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.lora_A)
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return qlora_linear(x, w, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], base.bias,
                        dropout=p)


def _fused_members(stock: type) -> dict:
    """The members of a fused LoRA layer's swapped class (forge_rt.nn._swap)."""
    return {"forward": _fused_forward}


def is_fused(module: nn.Module) -> bool:
    """Whether `accelerate` routed this LoRA layer through the fused op."""
    return is_swapped(module, _fused_members)


def accelerate(model: nn.Module, enable: bool = True, chunked_loss: bool = False) -> nn.Module:
    """Route each LoRA layer over a 4-bit base through forge_rt's fused qlora_linear (in place).

    enable=False restores PEFT's stock forward everywhere. Layers that can't be fused (other adapter
    types, DoRA and other LoRA variants, several active adapters, merged) keep the stock path and are
    counted. The summary dict is logged and attached as `model.forge_rt_summary`. Fused layers re-check
    each call (disabled or merged adapters, hooks, a bitsandbytes layout that isn't plain NF4) and count the
    calls that take the stock path in `forge_rt.nn.peft.stock_calls`. chunked_loss=True
    (opt-in: `logits` is then None whenever labels are given) also patches the causal LM so its loss
    runs the LM head only where labels are, a chunk at a time (forge_rt.nn.lm_loss)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    accelerated, skipped = 0, Counter()
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        reason = (_static_reason(module) or _adapter_reason(module)) if enable else "disabled"
        stock = stock_class(type(module))
        module.__class__ = stock if reason else swapped_class(stock, _fused_members)
        if reason is None:
            accelerated += 1
        elif enable:
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
