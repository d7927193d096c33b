"""NF4 quantize / dequantize: forge_rt against bitsandbytes (same bytes: tests/kernels/test_nf4.py checks it),
blocksize 64, double quantization (QLoRA's default). Times are medians (on a shared box the minimum has
shown impossible sub-millisecond outliers)."""
from __future__ import annotations

import sys
from functools import lru_cache

import torch

from forge_rt import nf4
from forge_rt.bench.cases import Skip, have
from forge_rt.bench.record import row
from forge_rt.bench.runner import run_pytest

ESTIMATE_S = {"tiny": 2, "quick": 15, "full": 60}


def cases(ctx, test: str) -> list[dict]:
    shapes = ctx.pick([(256, 256)], [(2048, 2048)], [(2048, 2048), (5632, 2048)])
    dtypes = ctx.pick(("float32",), ("float32", "bfloat16"), ("float32", "bfloat16"))
    return [dict(id=f"{op}-{n}x{k}-{dt}-{impl}", op=op, N=n, K=k, dtype=dt, impl=impl)
            for n, k in shapes for dt in dtypes for op in ("quantize", "dequantize") for impl in ("ours", "bnb")]


@lru_cache(maxsize=1)
def _weight(N: int, K: int, dtype: str, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, K, generator=g) * 0.02).to(device, getattr(torch, dtype))


def _fn(case, w):
    import bitsandbytes.functional as bnbF
    if case["op"] == "quantize":
        if case["impl"] == "ours":
            return lambda: nf4.quantize(w, blocksize=64, double_quant=True)
        return lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = nf4.quantize(w)
    packed, state = ours.to_bnb()
    if case["impl"] == "ours":
        return lambda: nf4.dequantize(ours)
    return lambda: bnbF.dequantize_4bit(packed, state)


def test_nf4(benchmark, ctx, case):
    fn = _fn(case, _weight(case["N"], case["K"], case["dtype"], ctx.torch_device))

    def run():
        fn()
        ctx.sync()
    benchmark.extra_info.update(case)
    benchmark.pedantic(run, rounds=ctx.pick(3, 5, 7), warmup_rounds=1)


def run(ctx) -> list[dict]:
    if not have("bitsandbytes"):
        raise Skip("bitsandbytes is not installed (the baseline)")
    t = {}
    for b in run_pytest(sys.modules[__name__], ctx):
        e = b["extra_info"]
        t.setdefault((e["op"], e["N"], e["K"], e["dtype"]), {})[e["impl"]] = b["stats"]["median"] * 1e3
    return [row("nf4", f"{op} {N}x{K} {dt}", v["ours"], "ms", baseline="bitsandbytes", baseline_value=v["bnb"])
            for (op, N, K, dt), v in t.items() if {"ours", "bnb"} <= v.keys()]
