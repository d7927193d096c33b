"""Load a causal LM offline: a HF directory or a .gguf file, in full precision or streamed straight into
NF4 linears (models.stream_load)."""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch

from forge_rt.models.paths import ModelLoadError, check_causal, check_complete, check_model_path, default_gguf_path
from forge_rt.models.gguf_file import apply_rope_freqs
from forge_rt.models.gguf_reader import fast_gguf
from forge_rt.models.stream_load import load_nf4
from forge_rt.pager.heap import trim_heap
from forge_rt.sovereign.guard import set_offline_env


def load_tokenizer(path: str | os.PathLike | None = None):
    """The model's tokenizer (from a HF directory or a .gguf), with the pad token training uses (eos when
    it has none); no network access, no weights read."""
    set_offline_env()
    from transformers import AutoTokenizer
    p = check_model_path(path if path is not None else default_gguf_path())
    try:
        if p.is_file():
            st = p.stat()
            tok = copy.deepcopy(_gguf_tokenizer(str(p.resolve()), st.st_size, st.st_mtime_ns))
            trim_heap()  # the copy goes through the vocabulary as JSON (Gemma 3: bench/results/tokenizer_rss.json)
        else:
            tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load model from {p}: its tokenizer did not load ({type(exc).__name__}: "
                             f"{exc})".splitlines()[0] + "; the file may be truncated or corrupt, or the tokenizer "
                             "files missing: copy the model again") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, size: int, mtime_ns: int):
    """A GGUF's tokenizer, converted once per file version and process: the conversion takes ~10 s for a 49k
    vocabulary (SmolLM2) and a run, its export and its evaluation each ask for it; callers get a copy."""
    from transformers import AutoTokenizer
    p = Path(path)
    with fast_gguf():
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    trim_heap()  # the conversion's Python lists of tokens and merges
    return tok


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, nf4: bool = False,
               tokenizer=None):
    """(model, tokenizer), loaded with no network access. A GGUF is dequantized to nn.Linear; with `nf4`
    a GGUF or safetensors checkpoint is streamed straight into NF4 linears (models.stream_load).
    `tokenizer`: one already loaded (load_tokenizer) to use instead of loading it again."""
    set_offline_env()
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    p = check_model_path(path if path is not None else default_gguf_path())
    if not p.is_file():
        check_causal(p)
    tok = tokenizer if tokenizer is not None else load_tokenizer(p)
    try:
        if p.is_file():
            kw = dict(gguf_file=p.name)
            if nf4:
                model = load_nf4(p, dtype)
            else:
                with fast_gguf():
                    model = AutoModelForCausalLM.from_pretrained(p.parent, dtype=dtype, **kw)
            apply_rope_freqs(model, p)  # Llama 3.x rope scaling, which transformers' GGUF loader drops
        else:
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
    model.eval()
    return model, tok
