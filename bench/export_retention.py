"""Retention perplexity of one run's GGUF exports, per --quant: what 4 bits cost in general text.

  python bench/export_retention.py RUN [--quants f16,q8_0,q6_k,q5_k_m,q4_k_m] [--json bench/results/kquant_retention.json]

Each export is written to a temporary directory and the run's retention text (the shipped sample) is scored
twice over the same sliding windows and tokens: in llama.cpp, on the file itself (`ppl_retention_llamacpp`:
teacher-forced log-probs, forge_rt.eval.llamacpp.LlamaCppEngine.perplexity; its kernels round activations to
8 bits in quantized matmuls), and in PyTorch over the file's blocks decoded to fp32 by forge_rt's GGUF loader
(`ppl_retention`). The gguf-base case is the base as trained at --quant with the run's adapter on top (gguf-lora
f16 in llama.cpp, PEFT in PyTorch), as `--to gguf-base` + `--to gguf-lora` deploy it. Run alone or beside
untimed work: only the perplexities are compared.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from forge_rt.bench.env import environment, loadavg
from forge_rt.data import demo_paths
from forge_rt.eval.hf import retention_perplexity
from forge_rt.export import export_run
from forge_rt.models import load_model, load_tokenizer
from run_exports import add_row, case_label, finish_record, run_files, run_imatrix


def _perplexity(gguf: Path, adapter: Path | None, text: str) -> float:
    model, tok = load_model(gguf)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    return retention_perplexity(model, tok, text)


def _llamacpp_perplexity(gguf: Path, lora: Path | None, text: str) -> float:
    from forge_rt.eval.llamacpp import LlamaCppEngine
    ids = load_tokenizer(gguf)(text, add_special_tokens=False)["input_ids"]
    return LlamaCppEngine(gguf, lora, n_ctx=1024).perplexity(ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--quants", default="f16,q8_0,q6_k,q5_k_m,q4_k_m")
    p.add_argument("--json", type=Path)
    p.add_argument("--cases", help="only these, comma-separated KIND:QUANT[:imatrix] (default: each --quants merged, "
                                   "then gguf:q4_k_m:imatrix, gguf-base:q4_k_m and gguf-base:q4_k_m:imatrix)")
    a = p.parse_args(argv)
    metrics, cfg = run_files(a.run)
    text = demo_paths()["retention"].read_text()
    record = {"run": str(a.run), "pytorch_nf4_run": {k: metrics.get(k) for k in (
                  "ppl_retention_base", "ppl_retention_tuned", "ppl_retention_change_pct")},
              "environment": environment(), "loadavg_before": loadavg(),
              "retention": "the shipped retention sample, sliding windows of 512 tokens, stride 256", "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_imatrix(a.run, tmp / "imatrix.dat", cfg.get("max_len", 512))
        lora = tmp / "lora.gguf"
        export_run(a.run, {"gguf-lora": lora}, quant="f16")
        cases = [("gguf", q, False) for q in a.quants.split(",")]
        cases += [("gguf", "q4_k_m", True), ("gguf-base", "q4_k_m", False), ("gguf-base", "q4_k_m", True)]
        if a.cases:
            cases = [(c.split(":")[0], c.split(":")[1], c.endswith(":imatrix")) for c in a.cases.split(",")]
        for kind, quant, with_imatrix in cases:
            out = tmp / f"{kind}-{quant}{'-imatrix' if with_imatrix else ''}.gguf"
            export_run(a.run, {kind: out}, quant=quant, imatrix=tmp / "imatrix.dat" if with_imatrix else None)
            ppl = _perplexity(out, a.run / "adapter" if kind == "gguf-base" else None, text)
            ppl_llamacpp = _llamacpp_perplexity(out, lora if kind == "gguf-base" else None, text)
            base = metrics["ppl_retention_base"]
            row = {"export": case_label(kind, quant, with_imatrix)
                             + (" (+ the run's adapter)" if kind == "gguf-base" else ""),
                   "bytes": out.stat().st_size, "ppl_retention": ppl,
                   "change_vs_base_pct": 100 * (ppl / base - 1), "ppl_retention_llamacpp": ppl_llamacpp,
                   "change_vs_base_llamacpp_pct": 100 * (ppl_llamacpp / base - 1)}
            add_row(record, row, a.json)
            out.unlink()
    finish_record(record, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
