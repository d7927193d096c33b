"""Shared by the trainer tests: a tiny random Llama saved as a HF model directory (with SmolLM2's
tokenizer, so chat templates are real) and a small prompt/completion dataset."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def make_tiny_model_dir(path: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_rows(n: int = 24) -> list[dict]:
    codes = ["NORMAL", "INSPECT", "SHUTDOWN"]
    return [{"prompt": f"Reading {i}: temperature {40 + 7 * i} C. Verdict?",
             "completion": json.dumps({"status": codes[i % 3], "fault_code": "NONE", "reason": f"case {i}"})}
            for i in range(n)]


def tiny_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--output", str(out), "--no-live", "--no-eval",
            "--max-steps", "6", "--batch-size", "4", "--max-len", "64", "--lora-r", "4", "--warmup-steps", "1",
            "--checkpoint-every", "2", "--lr", "5e-3", *extra]
