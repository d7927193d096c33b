"""Causal-LM loss where the labels are, for Hugging Face models, without forking their forward.

    loss = causal_lm_loss(model, input_ids, attention_mask, labels=labels)   # == model(...).loss
    patch_causal_lm_loss(model)            # model(..., labels=...).loss now takes this path
    patch_causal_lm_loss(model, enable=False)

The decoder body runs as usual; its last hidden states go to forge_rt.ops.linear_cross_entropy with the
LM head's weight and bias, which evaluates the head only at positions with a label, a chunk of tokens at
a time. The [batch, seq, vocab] logits (and their gradient) of the stock path never exist. The loss is
HF's ForCausalLMLoss: labels shifted left by one, cross-entropy in fp32, mean over the labelled positions,
or their sum divided by `num_items_in_batch` when that is given (what Trainer passes under gradient
accumulation). Works for HF causal LMs and PEFT models over them (LoRA and other non-prompt-learning
adapters), with Gemma 2's final_logit_softcapping.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from forge_rt import ops
from forge_rt.nn._swap import stock_class, swapped_class

# config fields by which an architecture rescales its logits after the head (Cohere, Granite, Falcon-H1):
# the fused loss doesn't reproduce them, so such models are refused rather than given a wrong loss
_RESCALED_LOGITS = ("logit_scale", "logits_scaling", "lm_head_multiplier")
# ForCausalLMLoss's own keyword arguments (HF forwards pass them next to the decoder's)
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   **kwargs) -> torch.Tensor:
    """The 0-d fp32 loss `model(input_ids, attention_mask, labels=labels, **kwargs).loss` would give.

    model: a transformers causal LM or a PEFT model over one. kwargs go to the decoder (position_ids,
    inputs_embeds, ...) except ForCausalLMLoss's own: num_items_in_batch (sum / it instead of the mean),
    ignore_index (default -100) and shift_labels (already shifted labels, used instead of `labels`)."""
    return _fused_forward(_causal_lm(model), input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          **kwargs)[0]


def patch_causal_lm_loss(model: nn.Module, enable: bool = True) -> nn.Module:
    """Make `model(..., labels=...)` compute its loss with causal_lm_loss (in place; returns `model`).

    With labels (as a keyword) the output is a CausalLMOutputWithPast whose `.loss` is the fused loss and
    whose `logits` is None (they are never computed); the decoder's cache, hidden states and attentions
    are passed through. Without labels the stock forward runs, so generate() and plain inference are
    unchanged. `enable=False` restores the stock class. The patch swaps the model's class for a subclass
    that only overrides forward (isinstance and class name unchanged, nothing stored on the instance), and
    survives copy.deepcopy, pickling and torch.save / torch.load(weights_only=False)."""
    hf = _causal_lm(model)
    stock = stock_class(type(hf))
    hf.__class__ = swapped_class(stock, _loss_members) if enable else stock
    return model


def _causal_lm(model: nn.Module):
    """The transformers causal LM inside `model` (itself, or under a PEFT wrapper), checked for a head the
    fused loss reproduces exactly."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import ForCausalLMLoss

    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError("causal_lm_loss: prompt-learning PEFT models (prompt/prefix tuning) add virtual "
                             "tokens in their own forward; use the stock loss for them")
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise TypeError(f"causal_lm_loss: {name} is not a transformers causal LM with an LM head")
    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(f"causal_lm_loss: {name} computes its loss with {model.loss_function!r}, not "
                         "ForCausalLMLoss; the fused loss would differ")
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        raise ValueError(f"causal_lm_loss: {name}'s LM head is a {type(head).__name__}"
                         f"{' with hooks' if type(head) is nn.Linear else ''}; the fused loss reads its weight "
                         "and bias directly, so it needs a plain nn.Linear (no adapter, quantization or "
                         "hooks on the head)")
    config = model.config.get_text_config()
    for field in _RESCALED_LOGITS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise ValueError(f"causal_lm_loss: {name} rescales its logits ({field}={getattr(config, field)}), "
                             "which the fused loss does not reproduce")
    return model


def _fused_forward(hf, labels=None, return_dict=None, logits_to_keep=None, **kwargs):
    """(loss, decoder output) of the causal LM `hf` on forward's arguments. return_dict and logits_to_keep
    shape forward's output, which the caller builds (and which has no logits), so they are dropped."""
    loss_kw = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    ignore_index = loss_kw.get("ignore_index", -100)
    shifted = loss_kw.get("shift_labels")
    if shifted is None:
        if labels is None:
            raise ValueError("causal_lm_loss: pass labels (or shift_labels)")
        shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # position t predicts token t + 1
    decoder = hf.get_decoder()
    if decoder is hf:
        raise TypeError(f"causal_lm_loss: {type(hf).__name__} has no separate decoder body")
    out = decoder(**kwargs)
    hidden = out.last_hidden_state
    head = hf.get_output_embeddings()
    num_items = loss_kw.get("num_items_in_batch")
    loss = ops.linear_cross_entropy(hidden, head.weight, shifted.reshape(hidden.shape[:-1]).to(hidden.device),
                                    head.bias, ignore_index=ignore_index,
                                    reduction="mean" if num_items is None else "sum",
                                    softcap=getattr(hf.config.get_text_config(), "final_logit_softcapping", None))
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss, out


def _loss_members(stock: type) -> dict:
    """The members of `stock`'s swapped class: a forward that takes the fused path when labels are given."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    signature = inspect.signature(stock.forward)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}

    @functools.wraps(stock.forward)  # keeps the signature generate() and Trainer inspect
    def forward(self, *args, **kwargs):
        named = signature.bind(self, *args, **kwargs).arguments
        named.pop(next(iter(signature.parameters)))  # self
        named.update(named.pop(var_kw, {}))
        if named.get("labels") is None:  # no loss asked for: the stock forward, logits and all
            return stock.forward(self, *args, **kwargs)
        return_dict = named.get("return_dict")
        loss, out = _fused_forward(self, **named)
        result = CausalLMOutputWithPast(loss=loss, logits=None,
                                        **{k: v for k, v in out.items() if k in fields and k != "logits"})
        return result.to_tuple() if return_dict is False else result

    return {"forward": forward}
