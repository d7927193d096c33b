"""Held-out scores in llama.cpp of one run's GGUF exports, per --quant, with and without an importance matrix.

  python bench/export_scores.py RUN [--quants q4_k_m,q5_k_m,q6_k] [--json bench/results/kquant_scores.json]

RUN is a finished run directory (the default job's: `python -m forge_rt.train`). The importance matrix is
collected as `--imatrix` does in the trainer: one no-grad pass of the run's training data (the demo's, here)
through the tuned model. Each export is written to a temporary directory and scored as
`python -m forge_rt.evaluate --gguf FILE [--lora ADAPTER]` scores it (200 held-out demo rows, greedy); the run's
own PyTorch score comes from RUN/metrics.json. Run it alone: llama.cpp's threads share the two cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from forge_rt.bench.env import environment, loadavg
from forge_rt.data import demo_paths, load_examples
from forge_rt.eval.llamacpp import evaluate_gguf
from forge_rt.export import export_run
from run_exports import add_row, case_label, finish_record, run_files, run_imatrix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--quants", default="q4_k_m,q5_k_m,q6_k")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    metrics, cfg = run_files(a.run)
    evals = load_examples(demo_paths()["eval"])
    record = {"run": str(a.run), "pytorch_tuned_score": metrics.get("score_tuned"),
              "pytorch_eval_engine": metrics.get("eval_engine"), "environment": environment(),
              "loadavg_before": loadavg(), "eval": f"{len(evals)} held-out demo rows, greedy, llama.cpp (xllamacpp)",
              "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        imat = run_imatrix(a.run, tmp / "imatrix.dat", cfg.get("max_len", 512))
        record["imatrix"] = {**imat, "path": None, "seconds": time.perf_counter() - t0}
        cases = [("gguf", q, False) for q in a.quants.split(",")]
        cases += [("gguf", "q4_k_m", True), ("gguf-base", "q4_k_m", False), ("gguf-base", "q4_k_m", True)]
        for kind, quant, with_imatrix in cases:
            name = f"{kind}-{quant}{'-imatrix' if with_imatrix else ''}"
            out, lora = tmp / f"{name}.gguf", tmp / "adapter-f16.gguf"
            t0 = time.perf_counter()
            export_run(a.run, {kind: out}, quant=quant, imatrix=tmp / "imatrix.dat" if with_imatrix else None)
            if kind == "gguf-base" and not lora.exists():  # the adapter over it, at the adapter types' f16
                export_run(a.run, {"gguf-lora": lora}, quant="f16")
            exported = time.perf_counter() - t0
            res = evaluate_gguf(out, lora if kind == "gguf-base" else None, eval_rows=evals,
                                max_new_tokens=cfg.get("max_new_tokens", 64))
            row = {"export": case_label(kind, quant, with_imatrix)
                             + (" (+ --to gguf-lora --quant f16)" if kind == "gguf-base" else ""),
                   "bytes": out.stat().st_size, "export_seconds": exported,
                   **{k: res[k] for k in ("score", "exact", "field_acc", "valid_json", "n", "seconds")}}
            add_row(record, row, a.json)
            out.unlink()
    finish_record(record, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
