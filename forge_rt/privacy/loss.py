"""Per-example losses of a causal LM: each example's mean token loss over its own labelled tokens.

HF's batch loss is a mean over all labelled tokens of the batch, which ties each example's gradient to
the other examples' lengths; DP needs a loss that is a sum of per-example terms, each depending on its
example only, so that the gradient at every layer splits by example."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forge_rt.privacy.errors import DPError


def _shifted(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # position t predicts token t + 1


def _per_row_mean(token_loss: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    count = (shifted != -100).sum(1)
    if bool((count == 0).any()):
        row = int((count == 0).nonzero()[0])
        raise DPError(f"per-example loss: batch row {row} has no labelled token; such an example adds nothing")
    return token_loss.sum(1) / count


def example_losses(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, chunked: bool = False, **kwargs) -> torch.Tensor:
    """[B] fp32: example i's loss as the model would give for a batch of that example alone (HF's
    ForCausalLMLoss: labels shifted by one, fp32 cross-entropy, mean over its labelled tokens).

    chunked=True computes it through forge_rt's fused LM-head loss (forge_rt.ops.linear_cross_entropy, one
    call per example on the decoder's hidden states), so the [B, T, vocab] logits never exist."""
    if labels is None:
        raise DPError("per-example loss: pass labels")
    shifted = _shifted(labels)
    if chunked:
        return _chunked(model, input_ids, attention_mask, shifted, **kwargs)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    tok = F.cross_entropy(logits.float().transpose(1, 2), shifted.to(logits.device), ignore_index=-100,
                          reduction="none")
    return _per_row_mean(tok, shifted.to(tok.device))


def _chunked(model, input_ids, attention_mask, shifted, **kwargs) -> torch.Tensor:
    from forge_rt.nn.lm_loss import _causal_lm  # the checks that the fused head loss equals the model's
    from forge_rt.ops import linear_cross_entropy
    hf = _causal_lm(model)
    softcap = getattr(hf.config.get_text_config(), "final_logit_softcapping", None)
    hidden = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              **kwargs).last_hidden_state
    head = hf.get_output_embeddings()
    shifted = shifted.to(hidden.device)
    _per_row_mean(torch.zeros(shifted.shape, device=shifted.device), shifted)  # refuses unlabelled rows first
    return torch.stack([linear_cross_entropy(hidden[i], head.weight, shifted[i], head.bias, softcap=softcap)
                        for i in range(hidden.shape[0])])
