"""`--to hf`: the merged model as a Hugging Face directory (safetensors + config + tokenizer) that stock
transformers loads with no forge_rt installed."""
from __future__ import annotations

from pathlib import Path

import torch


def write_hf(merged, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """Writes into directory `out` (the caller makes it atomic)."""
    merged.config.dtype = dtype
    # A model loaded from a GGUF remembers that file; the saved directory stands on its own.
    for attr in ("gguf_file", "quantization_config"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
