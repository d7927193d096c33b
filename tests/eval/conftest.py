"""Shared by the evaluation tests: a tiny random Llama (SmolLM2's tokenizer) in NF4 with a random, non-zero
LoRA adapter, its held-out rows, and a private evaluation cache."""
from __future__ import annotations

import pytest
import torch

from forge_rt.testing import make_tiny_model_dir, tiny_rows, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test starts with an empty cache, never the user's ~/.cache/forge_rt."""
    monkeypatch.setenv("FORGE_RT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_dir(smol_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-tiny")
    return make_tiny_model_dir(root / "model", smol_tok), write_jsonl(root / "eval.jsonl", tiny_rows(6))


@pytest.fixture(scope="module")
def tiny_peft(tiny_dir):
    """(PEFT model over the NF4 base, tokenizer): LoRA B drawn at random so the adapter changes the answers."""
    from forge_rt.models import LoraSpec, build_model, load_model
    base, tok = load_model(tiny_dir[0], nf4=True)
    torch.manual_seed(1)
    model = build_model(base, LoraSpec(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval(), tok
