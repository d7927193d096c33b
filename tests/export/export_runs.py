"""Run directories as the trainer writes them, holding a random (non-zero) LoRA adapter over a model: the export
tests' helper (a module of its own: `from conftest import` finds whichever conftest was imported last)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import torch

PASSPHRASE = "correct horse battery staple"


def make_run(run, model_dir, tok, no_fused=False, seal_phrase=None, seed=1):
    """A run directory as the trainer writes it (config.json, adapter/ or adapter.sealed, tokenizer/),
    with LoRA B initialised at random so the adapter changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from forge_rt import quantize_model
    from forge_rt.sovereign import seal
    from forge_rt.train.config import TrainConfig

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if not no_fused:
        quantize_model(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # PEFT's random init is too large for a meaningful tiny model; keep deltas moderate
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    run.mkdir(parents=True)
    model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "tokenizer")
    cfg = TrainConfig(model=str(model_dir), no_fused=no_fused, lora_r=4, lora_alpha=8)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    if seal_phrase is not None:
        seal.seal_dir(run / "adapter", run / "adapter.sealed", seal_phrase, kdf_params=(10, 8, 1))
        shutil.rmtree(run / "adapter")
    return run
