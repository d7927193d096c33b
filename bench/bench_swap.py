"""forge_rt.accelerate on a stock PEFT + bitsandbytes 4-bit LoRA model: step time before and after.

    python bench/bench_swap.py [--layers 30] [--tokens 2x64] [--rounds 3] [--json bench/results/swap.json]

SmolLM2-135M-Instruct (fp32 compute), every linear except lm_head as a bitsandbytes Linear4bit (NF4,
double quantization, blocksize 64; bytes made by forge_rt.nf4, identical to bitsandbytes' own), LoRA
r=16 on all seven projections. Rounds alternate stock / accelerated so drift of a shared machine hits
both alike; reported: median forward and forward+backward seconds and the speedup.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from forge_rt import nf4
import forge_rt.nn as swap
from forge_rt.testing import LLAMA_TARGETS, cut_layers
from forge_rt.train.model import load_model



def bnb_model(layers: int):
    model, _ = load_model(dtype=torch.float32)
    cut_layers(model, layers)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name != "lm_head":
            packed, state = nf4.quantize(mod.weight.data).to_bnb()
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    compute_dtype=torch.float32, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, quant_type="nf4",
                                           bnb_quantized=True, compress_statistics=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    model.is_loaded_in_4bit = True
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA_TARGETS)))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", default="2x64", help="batch x sequence length")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    b, s = (int(v) for v in args.tokens.split("x"))
    pm = bnb_model(args.layers)
    ids = torch.randint(0, 10000, (b, s), generator=torch.Generator().manual_seed(0))

    def fwd():
        with torch.no_grad():
            pm(input_ids=ids)

    def step():
        pm.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()

    times = {k: [] for k in ("stock_fwd", "stock_step", "fused_fwd", "fused_step")}
    for r in range(args.rounds + 1):  # round 0 warms both paths up and is dropped
        for mode in ("stock", "fused"):
            swap.accelerate(pm, enable=mode == "fused")
            f, st = timed(fwd), timed(step)
            if r:
                times[f"{mode}_fwd"].append(f)
                times[f"{mode}_step"].append(st)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"layers": args.layers, "tokens": args.tokens, "rounds": args.rounds, "median_s": med,
              "speedup_fwd": med["stock_fwd"] / med["fused_fwd"],
              "speedup_step": med["stock_step"] / med["fused_step"], "summary": pm.forge_rt_summary}
    print(json.dumps(result, indent=1))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
