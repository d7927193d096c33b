"""python -m forge_rt.export RUN_DIR --to {gguf,gguf-lora,gguf-base,hf} --out PATH"""
from __future__ import annotations

import argparse
import json

from forge_rt.cli.common import run_command
from forge_rt.export.api import DTYPES, KINDS, export_run
from forge_rt.export.gguf_common import QUANTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m forge_rt.export",
                                description="Export a trained adapter for deployment: a merged HF directory, a merged "
                                            "GGUF for llama.cpp, a llama.cpp LoRA GGUF, or the base GGUF as training saw it "
                                            "(4-bit weights decoded: the base to run that LoRA GGUF over).")
    p.add_argument("run", nargs="?", help="run directory written by python -m forge_rt.train")
    p.add_argument("--to", required=True, choices=KINDS, help="what to write")
    p.add_argument("--out", required=True, help="output file (gguf, gguf-lora, gguf-base) or directory (hf)")
    p.add_argument("--adapter", help="PEFT adapter directory or adapter.sealed file (instead of the run's)")
    p.add_argument("--model", help="base model, HF directory or .gguf (default: the run's, else the shipped SmolLM2)")
    p.add_argument("--quant", help=f"GGUF tensor type: {', '.join(QUANTS)} (default f16; adapters: f32, f16, bf16, q8_0)")
    p.add_argument("--imatrix", help="llama.cpp imatrix.dat: importance weights for the gguf / gguf-base quantizer")
    p.add_argument("--dtype", default="float32", help=f"hf export weights: {', '.join(DTYPES)} (default float32)")
    p.add_argument("--passphrase-file", help="passphrase of a sealed adapter (else $FORGE_RT_PASSPHRASE or a prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a = p.parse_args(argv)

    def body():
        records = export_run(a.run, {a.to: a.out}, adapter=a.adapter, model=a.model, quant=a.quant, dtype=a.dtype,
                             overwrite=a.overwrite, passphrase_file=a.passphrase_file, imatrix=a.imatrix)
        for rec in records:
            print(json.dumps({k: rec[k] for k in ("kind", "output", "bytes", "quant", "dtype", "seconds", "manifest")}))
    return run_command(body)
