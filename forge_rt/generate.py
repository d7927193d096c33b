"""Try a trained run: `python -m forge_rt.generate --run RUN_DIR "prompt"` (add `--base` to compare
with the model before fine-tuning). Rebuilds the run's model exactly as it was trained (same base,
NF4 quantization and fused kernels unless the run used --no-fused) and loads its adapter."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from forge_rt.config import TrainConfig


class RunDirError(RuntimeError):
    pass


def load_run(run: str | os.PathLike):
    """(model, tokenizer, config) of a finished run; the adapter comes from adapter/ or, for a sealed
    run, from adapter.sealed decrypted in memory (passphrase from FORGE_RT_PASSPHRASE or a prompt)."""
    from forge_rt.model_load import load_model
    from forge_rt.train import build_model

    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise RunDirError(f"{run} has no config.json; pass a run directory written by python -m forge_rt.train")
    cfg = TrainConfig(**json.loads(cfg_path.read_text()))
    adapter, sealed = run / "adapter", run / "adapter.sealed"
    if not (adapter / "adapter_config.json").is_file() and not sealed.is_file():
        raise RunDirError(f"{run} has no adapter/ (the run did not finish?); resume it with "
                          f"python -m forge_rt.train --resume {run}")
    base, tok = load_model(cfg.model)
    if (run / "tokenizer").is_dir():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    if (adapter / "adapter_config.json").is_file():
        model = build_model(base, cfg, adapter_dir=adapter)
    else:
        model = _load_sealed(base, cfg, sealed)
    return model.eval(), tok, cfg


def _load_sealed(base, cfg: TrainConfig, sealed: Path):
    import getpass
    from forge_rt import seal
    phrase = os.environ.get("FORGE_RT_PASSPHRASE") or getpass.getpass(f"Passphrase for {sealed}: ")
    if not cfg.no_fused:
        from forge_rt.swap import accelerate, quantize_model
        return accelerate(seal.load_peft(quantize_model(base), sealed, phrase))
    return seal.load_peft(base, sealed, phrase)


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
    p.add_argument("prompt", help="the user message; '-' reads it from stdin")
    args = p.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    from forge_rt.model_load import ModelLoadError
    from forge_rt.train import offline_guard
    try:
        with offline_guard():
            model, tok, _ = load_run(args.run)
            print(("tuned: " if args.base else "") + generate(model, tok, prompt, args.max_new_tokens))
            if args.base:
                with model.disable_adapter():
                    print("base:  " + generate(model, tok, prompt, args.max_new_tokens))
    except (RunDirError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
