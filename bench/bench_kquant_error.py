"""Weight error of the merged GGUF per --quant: K-quant mixes against the legacy single types.

  python bench/bench_kquant_error.py [--smollm2] [--json bench/results/kquant_error.json]

For each model a random LoRA (r 16 on every projection, B drawn at random) is merged into the fp32
weights and written by forge_rt's GGUF writer at each quant type. The file is read back by an independent
reader (the gguf package's GGUFReader + dequantize) and compared with the merged weights (in llama.cpp's
q/k row order): relative RMS error = sqrt(sum err^2 / sum w^2) over all matrices, and their bits per
weight (tensor bytes, metadata left out). Models: the tiny test Llama (hidden 64, where every K type falls back to 32-value blocks), the same
at hidden 256 (K blocks fit), and with --smollm2 the shipped SmolLM2-135M (its weights are the decoded
Q4_1 file, so q4_1 re-encodes a Q4_1 grid and its figure is left out).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from forge_rt.export.gguf_common import gguf_name, name_map, to_llamacpp_rows
from forge_rt.export.gguf_model import write_gguf
from forge_rt.models import default_gguf_path
from forge_rt.testing import lora_model

QUANTS = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_1", "q4_0"]


def _tokenizer():
    from transformers import AutoTokenizer
    p = default_gguf_path()
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def _model(kind: str, tok):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    if kind == "smollm2":
        p = default_gguf_path()
        return AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    hidden = {"tiny64": 64, "tiny256": 256}[kind]
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def _merged(model):
    torch.manual_seed(1)
    peft = lora_model(model, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return peft.merge_and_unload().eval()  # fp32 already (from_config / torch_dtype)


def _errors(path: Path, merged) -> dict:
    tmap = name_map("llama", merged.config)
    weights = {gguf_name(tmap, k): v for k, v in merged.state_dict().items() if gguf_name(tmap, k)}
    err = ref = 0.0
    n_values = n_bytes = 0
    types: dict = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) < 2:
            continue
        w = to_llamacpp_rows(weights[t.name], t.name, merged.config).double().numpy()
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).astype(np.float64)
        err += float(((back - w) ** 2).sum())
        ref += float((w ** 2).sum())
        n_values += w.size
        n_bytes += int(t.n_bytes)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"rel_rms_error": round(float(np.sqrt(err / ref)), 5), "tensor_types": types,
            "bits_per_weight": round(8 * n_bytes / n_values, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", action="store_true", help="also the shipped SmolLM2-135M (slower)")
    ap.add_argument("--json", help="write the record here")
    a = ap.parse_args(argv)
    tok = _tokenizer()
    record = {"command": "python bench/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "models": {}}
    for kind in ["tiny64", "tiny256"] + (["smollm2"] if a.smollm2 else []):
        merged = _merged(_model(kind, tok))
        rows = {}
        with tempfile.TemporaryDirectory() as d:
            for q in QUANTS:
                if kind == "smollm2" and q == "q4_1":
                    continue
                out = Path(d) / f"{q}.gguf"
                t0 = time.perf_counter()
                write_gguf(merged, tok, out, q, None)
                write_s = round(time.perf_counter() - t0, 2)
                rows[q] = {**_errors(out, merged), "write_s": write_s}
                print(kind, q, rows[q], flush=True)
        record["models"][kind] = rows
    for kind, rows in record["models"].items():
        if "q4_0" in rows and "q4_k_m" in rows:
            rows["q4_k_m_error_vs_q4_0"] = round(rows["q4_k_m"]["rel_rms_error"] / rows["q4_0"]["rel_rms_error"], 3)
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
