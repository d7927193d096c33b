"""An importance matrix from the run's own (already scrubbed) training data, in llama.cpp's sense: one no-grad
pass through the tuned model, a forward pre-hook on every linear, and per input column the mean of the squared
activations over every token that reached it; keyed by GGUF tensor name (imatrix.dat, imatrix.py)."""
from __future__ import annotations

import torch
from torch import nn

from .gguf_arch import HF_ARCHS
from .gguf_common import gguf_name, name_map
from .imatrix import ImatrixError, write_imatrix_dat
from .merge import _is_4bit


def _linears(inner: nn.Module):
    """(HF name, module) of every linear as the merged model will have it: a LoRA layer counts once, as its base."""
    from peft.tuners.lora import LoraLayer
    skip = None
    for name, module in inner.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(module, LoraLayer) or _is_4bit(module) or type(module) is nn.Linear:
            skip = name + "."
            yield name, module


def collect_imatrix(model: nn.Module, sequences, max_tokens: int = 200_000) -> tuple[dict, int]:
    """({GGUF tensor name: per-column mean squared input (float32)}, sequences seen). `sequences`: token id
    lists, run one at a time (no padding enters the means), until `max_tokens` tokens."""
    from peft import PeftModel
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    config = inner.config
    if config.model_type not in HF_ARCHS:
        raise ImatrixError(f"--imatrix: model type {config.model_type!r} has no GGUF form")
    tmap = name_map(HF_ARCHS[config.model_type], config)
    tied = getattr(config, "tie_word_embeddings", False)
    sums, counts, hooks = {}, {}, []

    def hook_for(key):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]
        return hook

    for hf_name, module in _linears(inner):
        key = gguf_name(tmap, hf_name + ".weight")
        if key == "output.weight" and tied:
            key = "token_embd.weight"  # a tied head multiplies by the embedding (llama.cpp's name for it)
        if key is not None:
            hooks.append(module.register_forward_pre_hook(hook_for(key)))
    device = next(inner.parameters()).device
    seen = tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in sequences:
                if tokens >= max_tokens:
                    break
                model(input_ids=torch.tensor([list(ids)], device=device))
                seen, tokens = seen + 1, tokens + len(ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ImatrixError("--imatrix: no training sequence to collect activations from")
    return {k: (sums[k] / counts[k]).float().cpu().numpy() for k in sums}, seen


def write_run_imatrix(model: nn.Module, sequences, out, dataset: str = "") -> dict:
    """Collects and writes `out` (imatrix.dat); returns a small record for metrics.json."""
    entries, seen = collect_imatrix(model, sequences)
    write_imatrix_dat(out, entries, ncall=seen, chunks=seen, dataset=dataset)
    return {"path": str(out), "tensors": len(entries), "sequences": seen}
