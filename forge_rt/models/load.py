"""Load a causal LM offline: a HF directory or a .gguf file, in full precision or streamed straight into
NF4 linears (models.stream_load)."""
from __future__ import annotations

import os

import torch

from forge_rt.models.paths import ModelLoadError, check_causal, check_complete, check_model_path, default_gguf_path
from forge_rt.models.stream_load import load_nf4
from forge_rt.sovereign.guard import set_offline_env


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, nf4: bool = False):
    """(model, tokenizer), loaded with no network access. A GGUF is dequantized to nn.Linear; with `nf4`
    a GGUF or safetensors checkpoint is streamed straight into NF4 linears (models.stream_load)."""
    set_offline_env()
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_path(path if path is not None else default_gguf_path())
    try:
        if p.is_file():
            kw = dict(gguf_file=p.name)
            tok = AutoTokenizer.from_pretrained(p.parent, **kw)
            model = load_nf4(p, dtype) if nf4 else AutoModelForCausalLM.from_pretrained(p.parent, dtype=dtype, **kw)
        else:
            check_causal(p)
            tok = AutoTokenizer.from_pretrained(p)
            if nf4 and any(p.glob("*.safetensors")):
                model = load_nf4(p, dtype)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, output_loading_info=True)
                check_complete(p, info)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"could not load model from {p} ({type(exc).__name__}: {exc}); the weights may be "
                             "truncated or corrupt: copy the model again") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
