"""NF4 quantize / dequantize: forge_rt (C++) vs bitsandbytes 0.50's CPU path, in one run.

    python -m pytest bench/bench_nf4.py --benchmark-json=bench/results/nf4.json -q
    python bench/bench_nf4.py bench/results/nf4.json     # markdown ratio table from that run

Cases: weights of (2048, 2048) and (5632, 2048), fp32 and bf16, blocksize 64, double quantization on
(QLoRA's default). Both sides produce the same bytes (tests/test_nf4.py checks that). The table gives
each case's median time (on this shared box the minimum has shown impossible sub-millisecond outliers).
"""
from __future__ import annotations

import json
import sys
from functools import lru_cache

SHAPES = ((2048, 2048), (5632, 2048))
DTYPES = ("float32", "bfloat16")

if __name__ != "__main__":
    import pytest
    import torch

    bnbF = pytest.importorskip("bitsandbytes.functional")
    from forge_rt import nf4

    @lru_cache(maxsize=1)
    def weight(shape, dtype):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype))

    def quantize(impl, w):
        if impl == "ours":
            return lambda: nf4.quantize(w, blocksize=64, double_quant=True)
        return lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequantize(impl, w):
        ours = nf4.quantize(w)
        packed, state = ours.to_bnb()
        if impl == "ours":
            return lambda: nf4.dequantize(ours)
        return lambda: bnbF.dequantize_4bit(packed, state)

    @pytest.mark.parametrize("impl", ["ours", "bnb"])
    @pytest.mark.parametrize("op", ["quantize", "dequantize"])
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
    def test_nf4(benchmark, shape, dtype, op, impl):
        torch.set_num_threads(2)
        fn = (quantize if op == "quantize" else dequantize)(impl, weight(shape, dtype))
        benchmark.group = f"{op} {shape[0]}x{shape[1]} {dtype}"
        benchmark.pedantic(fn, rounds=7, warmup_rounds=1)


def table(path: str) -> str:
    """Markdown table: per group, median time of ours and bnb and the speedup bnb/ours."""
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        rows.setdefault(b["group"], {})[b["params"]["impl"]] = b["stats"]["median"]
    lines = ["| case | forge_rt ms | bitsandbytes ms | speedup |", "|---|---|---|---|"]
    for group, t in sorted(rows.items()):
        if {"ours", "bnb"} <= t.keys():
            lines.append(f"| {group} | {t['ours'] * 1e3:.1f} | {t['bnb'] * 1e3:.1f} | {t['bnb'] / t['ours']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
