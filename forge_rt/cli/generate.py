"""Try a trained run: `python -m forge_rt.generate --run RUN_DIR "prompt"` (add `--base` to compare
with the model before fine-tuning). Rebuilds the run's model exactly as it was trained (same base,
NF4 quantization and fused kernels unless the run used --no-fused) and loads its adapter."""
from __future__ import annotations

import argparse
import sys

import torch

from forge_rt.cli.common import run_command
from forge_rt.models import load_run

__all__ = ["generate", "load_run", "main"]


def generate(model, tok, prompt: str, max_new_tokens: int = 128) -> str:
    """Greedy reply to one user message, through the tokenizer's chat template."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m forge_rt.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory written by python -m forge_rt.train")
    p.add_argument("--base", action="store_true", help="also answer with the base model (no adapter) to compare")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--passphrase-file", help="for a sealed run: read the passphrase from this file "
                                             "(else $FORGE_RT_PASSPHRASE or a prompt)")
    p.add_argument("prompt", help="the user message; '-' reads it from stdin")
    args = p.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    def body():
        model, tok, _ = load_run(args.run, args.passphrase_file)
        print(("tuned: " if args.base else "") + generate(model, tok, prompt, args.max_new_tokens))
        if args.base:
            with model.disable_adapter():
                print("base:  " + generate(model, tok, prompt, args.max_new_tokens))
    return run_command(body)
