"""Per-example gradients of the LoRA weights, formed directly from each example's layer input and output
gradient, without per-example gradients of any full-size weight.

For a LoRA layer y = base(x) + s * (x A^T) B^T, example i's gradients are rank-r products:

    dB_i = s * g_i^T (x_i A^T)   [N, r]        dA_i = s * (g_i B)^T x_i   [r, K]

(x_i [T, K] its inputs, g_i [T, N] the gradient at its outputs). Forming them costs T*r*(N+K) per example;
the "ghost norm" alternative (||sum_t u_t v_t^T||^2 = sum_{t,t'} (u_t.u_t')(v_t.v_t')) costs T^2*(N+K) and
yields only the norm, so the clipped sum would need a second backward. With T (tokens) far above r (rank),
forming them is cheaper, and holding them costs B x the adapter's size, far less than the activations a
second backward would need.

Capture: a forward hook on each PEFT LoRA layer puts an identity autograd node (`_Tap`) on the layer's
output that saves the layer's input with save_for_backward. So the input goes through the pager's
saved-tensor hooks and is recomputed under gradient checkpointing like any activation (hooks fire again in
recomputation; only the node on the graph being differentiated runs its backward). The hook sits on the
LoRA layer itself, not on its base or lora_A/lora_B, so forge_rt's fused path stays on (nn.peft checks
those submodules). LoRA dropout must be off: the mask lives inside the fused op."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from forge_rt.privacy.errors import DPError


@dataclass
class _Layer:
    """One tapped LoRA layer: its adapter weights, scaling, and the per-example grads of the current
    micro-batch ([B, r, K] and [B, N, r], fp32) once its backward has run."""
    name: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    dA: torch.Tensor | None = None
    dB: torch.Tensor | None = None
    handle: object = field(default=None, repr=False)
    seconds: float = 0.0  # spent forming this layer's per-example gradients


class _Tap(torch.autograd.Function):
    """Identity on y; saves x; in backward hands (x, dL/dy) to its layer and passes the gradient on."""

    @staticmethod
    def forward(ctx, y, x, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return y.clone()  # not a view of y: the model may modify the layer's output in place

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t0 = time.perf_counter()
        _per_example(ctx.layer, x, g)
        ctx.layer.seconds += time.perf_counter() - t0
        return g, None, None


def _per_example(layer: _Layer, x: torch.Tensor, g: torch.Tensor) -> None:
    """dA_i, dB_i of every example (the leading dim) of this call, in fp32."""
    if x.dim() < 2:
        raise DPError(f"per-example gradients: layer {layer.name} got an input of shape {tuple(x.shape)}; "
                      "its first dimension must be the batch")
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1]).float()
    g3 = g.reshape(n, -1, g.shape[-1]).float()
    A, B = layer.A.detach().float(), layer.B.detach().float()
    h = x3 @ A.T                                                    # [B, T, r]
    dB = layer.scaling * torch.einsum("btn,btr->bnr", g3, h)
    dA = layer.scaling * torch.einsum("btr,btk->brk", g3 @ B, x3)
    # A layer called twice in one backward (shared weights) adds up, as autograd would.
    layer.dA = dA if layer.dA is None else layer.dA + dA
    layer.dB = dB if layer.dB is None else layer.dB + dB


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, PEFT LoRA layer, active adapter) of every LoRA layer whose adapter is trained."""
    from peft.tuners.lora import LoraLayer
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        trained = [a for a in active if mod.lora_A[a].weight.requires_grad or mod.lora_B[a].weight.requires_grad]
        if len(trained) > 1:
            raise DPError(f"per-example gradients: {name} trains {len(trained)} adapters at once; "
                          "train one adapter at a time under DP")
        if trained:
            found.append((name, mod, trained[0]))
    return found


def _check_layer(name: str, mod: nn.Module, adapter: str) -> None:
    drop = mod.lora_dropout[adapter]
    if isinstance(drop, nn.Dropout) and drop.p > 0:
        raise DPError(f"per-example gradients: {name} has LoRA dropout {drop.p}; its mask is drawn inside the "
                      "fused op and per-example gradients need it. Fix: LoRA dropout 0 (--lora-dropout 0)")
    if mod.use_dora.get(adapter, False) or adapter in getattr(mod, "lora_variant", {}):
        raise DPError(f"per-example gradients: {name} is a LoRA variant (DoRA, ...); only plain LoRA is supported")
    if mod.lora_B[adapter].bias is not None:
        raise DPError(f"per-example gradients: {name} has a LoRA bias; only plain LoRA A/B are supported")


class PerExampleGrads:
    """Taps every trained LoRA layer of `model` (a PEFT model, fused by forge_rt.accelerate or not).

    After a backward of a loss that is a sum of per-example losses over a batch of B examples, `layers`
    hold each example's dA, dB. Every trainable parameter must be one of these A/B matrices: anything else
    (modules_to_save, embeddings) would be updated without per-example clipping, so it is refused."""

    def __init__(self, model: nn.Module):
        self.layers: list[_Layer] = []
        for name, mod, adapter in _lora_layers(model):
            _check_layer(name, mod, adapter)
            layer = _Layer(name, mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, float(mod.scaling[adapter]))
            layer.handle = mod.register_forward_hook(self._hook(layer))
            self.layers.append(layer)
        tapped = {id(p) for la in self.layers for p in (la.A, la.B)}
        other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in tapped]
        if other or not self.layers:
            self.remove()
            what = f"trainable parameters outside LoRA A/B: {', '.join(other[:4])}" if other else "no trained LoRA layer"
            raise DPError(f"per-example gradients: {what}. DP clips only LoRA A/B; freeze the rest")

    @staticmethod
    def _hook(layer: _Layer):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            return _Tap.apply(output, args[0], layer)
        return hook

    @property
    def seconds(self) -> float:
        """Time spent forming per-example gradients in backward, over all layers and calls."""
        return sum(la.seconds for la in self.layers)

    def params(self) -> list[nn.Parameter]:
        """The tapped parameters, in the fixed order A, B of each layer."""
        return [p for la in self.layers for p in (la.A, la.B)]

    def squared_norms(self) -> torch.Tensor:
        """||grad_i||^2 over all tapped parameters, per example [B] (fp32)."""
        done = [la for la in self.layers if la.dA is not None]
        if len(done) != len(self.layers):
            missing = [la.name for la in self.layers if la.dA is None]
            raise DPError(f"per-example gradients: no backward reached {', '.join(missing[:3])}: run the forward "
                          "and backward of the whole batch with grad enabled before clipping")
        return sum(la.dA.pow(2).sum((1, 2)) + la.dB.pow(2).sum((1, 2)) for la in self.layers)

    def weighted_sums(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """sum_i w_i grad_i of each tapped parameter, in params() order."""
        return [t for la in self.layers for t in (torch.einsum("b,bij->ij", weights, la.dA),
                                                  torch.einsum("b,bij->ij", weights, la.dB))]

    def clear(self) -> None:
        for la in self.layers:
            la.dA = la.dB = None

    def remove(self) -> None:
        """Takes the hooks off (the model is as it was)."""
        for la in self.layers:
            if la.handle is not None:
                la.handle.remove()
                la.handle = None
        self.clear()
