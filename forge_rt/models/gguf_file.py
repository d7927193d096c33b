"""Llama 3.x rope scaling from a GGUF. llama.cpp's converter stores it as one divisor per rotary frequency
(the rope_freqs tensor) and no scaling keys; transformers' GGUF loader drops that tensor, so the model would
rotate with plain rope and differ from the file in llama.cpp. The divisors are applied to the model's
inverse frequencies here: the rotation llama.cpp computes."""
from __future__ import annotations

from pathlib import Path

import torch

from forge_rt.models.paths import ModelLoadError, gguf_facts


def gguf_rope_freqs(path: Path) -> torch.Tensor | None:
    """The file's rope_freqs divisors (fp32), or None when it has none."""
    factors = gguf_facts(path).rope_freqs
    return None if factors is None else torch.from_numpy(factors.copy())


def apply_rope_freqs(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Divides the rotary embedding's inverse frequencies by the GGUF's rope_freqs, in place; a model
    whose config already carries a rope scaling is left as transformers built it."""
    factors = gguf_rope_freqs(path)
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    if factors is None or rope.get("rope_type", "default") != "default":
        return model
    rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotary or any(m.inv_freq.shape != factors.shape for m in rotary):
        raise ModelLoadError(f"{path}: its rope_freqs ({factors.numel()} values) do not fit the model's rotary "
                             "embedding; the file's rope scaling cannot be reproduced")
    for m in rotary:
        m.inv_freq = m.inv_freq / factors.to(m.inv_freq)
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
            m.original_inv_freq = m.inv_freq.clone()
    return model
