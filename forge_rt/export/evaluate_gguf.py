"""`python -m forge_rt.evaluate --gguf FILE [--lora FILE]`: the held-out composite score of an exported
model, measured in llama.cpp (what gets deployed). The entry shim in forge_rt/evaluate.py calls `main`."""
from __future__ import annotations

import argparse
import json
import sys

from .llamacpp import LlamaCppError, evaluate_gguf


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
    from ._forge import DataError, demo_paths, load_examples
    try:
        rows = load_examples(a.eval_data or demo_paths()["eval"])
        if a.limit:
            rows = rows[:a.limit]
        result = evaluate_gguf(a.gguf, a.lora, rows, a.max_new_tokens, a.threads)
    except (DataError, LlamaCppError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"score {result['score']:.1f}  exact {result['exact']:.2f}  field_acc {result['field_acc']:.2f}  "
          f"valid_json {result['valid_json']}  n {result['n']}  {result['seconds']:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
