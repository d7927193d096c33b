"""`python -m forge_rt.evaluate --gguf FILE [--lora FILE]`: the held-out composite score of an exported
model, measured in llama.cpp (what gets deployed). The entry shim in forge_rt/evaluate.py calls `main`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from forge_rt.cli.common import run_command
from forge_rt.core.atomic import write_atomic
from forge_rt.data import demo_paths, load_examples
from forge_rt.eval.llamacpp import evaluate_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m forge_rt.evaluate",
                                description="Score a GGUF model (+ GGUF LoRA adapter) in llama.cpp on held-out data.")
    p.add_argument("--gguf", required=True, help="model GGUF (a merged export, or the base for --lora)")
    p.add_argument("--lora", help="llama.cpp LoRA adapter GGUF (python -m forge_rt.export --to gguf-lora)")
    p.add_argument("--eval-data", help="held-out JSON/JSONL (default: the shipped demo's 200 examples)")
    p.add_argument("--limit", type=int, help="first N examples only")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: all usable cores)")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    return run_command(lambda: _score(a))


def _score(a) -> None:
    rows = load_examples(a.eval_data or demo_paths()["eval"])
    if a.limit:
        rows = rows[:a.limit]
    result = evaluate_gguf(a.gguf, a.lora, rows, a.max_new_tokens, a.threads)
    print(f"score {result['score']:.1f}  exact {result['exact']:.2f}  field_acc {result['field_acc']:.2f}  "
          f"valid_json {result['valid_json']}  n {result['n']}  {result['seconds']:.0f} s")
    if a.json:
        write_atomic(Path(a.json), json.dumps(result, indent=2))
