"""Fused NF4 LoRA linear (ops.qlora_linear: C++ on CPU, Triton on GPU) against dense `x @ W.T` plus the LoRA
term on the unquantized weight and against bitsandbytes (dequantize_4bit + matmul forward, matmul_4bit both
ways); fused linear + cross-entropy against HF's stock LM-head loss. r = 16, double-quantized NF4 (QLoRA's
default). Times are each case's minimum (the most stable statistic on a shared machine)."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from forge_rt import nf4, ops
from forge_rt.bench.cases import have
from forge_rt.bench.record import row
from forge_rt.bench.runner import run_pytest

ESTIMATE_S = {"tiny": 3, "quick": 35, "full": 240}
RANK, SCALING = 16, 2.0


def _dtype(ctx) -> torch.dtype:
    return torch.float32 if ctx.device == "cpu" else torch.bfloat16  # the CPU path computes in fp32


def cases(ctx, test: str) -> list[dict]:
    if test == "test_linear_ce":
        vh = ctx.pick((512, 32, 2, 16), (49152, 576, 8, 144), (49152, 576, 8, 144))
        return [dict(id=f"{impl}-{head}", impl=impl, head=head, V=vh[0], H=vh[1], rows=vh[2], seq=vh[3])
                for head in ("frozen", "trained") for impl in ("stock", "fused")]
    shapes = ctx.pick([(256, 256)], [(2048, 2048), (5632, 2048)], [(2048, 2048), (5632, 2048), (2048, 5632)])
    ms = ctx.pick((1, 16), (1, 16, 256), (1, 16, 1024))
    modes = ctx.pick(("fwd",), ("fwd", "fwd+bwd"), ("fwd", "fwd+bwd"))
    impls = ("ours", "dense") + (("bnb",) if have("bitsandbytes") else ())
    return [dict(id=f"{n}x{k}-M{m}-{mode}-{impl}", N=n, K=k, M=m, mode=mode, impl=impl)
            for n, k in shapes for m in ms for mode in modes for impl in impls]


def _rounds(ctx, m: int) -> int:
    return ctx.pick(3, {1: 20, 16: 10}.get(m, 3), {1: 50, 16: 20}.get(m, 3))


@lru_cache(maxsize=1)  # one weight shape alive at a time (5632 x 2048 fp32 is 46 MB)
def weights(N: int, K: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g) / K**0.5
    w = nf4.quantize(W, double_quant=True)
    w.absmax_fp32()  # resolve double quantization once, as a loaded model would
    w = w.to(device) if device != "cpu" else w
    packed, state = w.to_bnb()
    A = (torch.randn(RANK, K, generator=g) / K**0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(N, RANK, generator=g) / RANK**0.5).to(device, dtype).requires_grad_()
    return W.to(device, dtype), w, packed, state, A, B


def _impl(name: str, W, w, packed, state, A, B):
    lora = lambda x: SCALING * (x @ A.T) @ B.T  # noqa: E731
    if name == "ours":
        return lambda x: ops.qlora_linear(x, w, A, B, SCALING)
    if name == "dense":
        return lambda x: x @ W.T + lora(x)
    import bitsandbytes as bnb

    def bnb_path(x):
        if torch.is_grad_enabled():
            return bnb.matmul_4bit(x, packed.t(), quant_state=state) + lora(x)
        return x @ bnb.functional.dequantize_4bit(packed, state).to(x.dtype).T + lora(x)
    return bnb_path


def test_qlora(benchmark, ctx, case):
    N, K, M = case["N"], case["K"], case["M"]
    W, w, packed, state, A, B = weights(N, K, ctx.torch_device, _dtype(ctx))
    f = _impl(case["impl"], W, w, packed, state, A, B)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(ctx.torch_device, _dtype(ctx))
    gy = torch.randn(M, N, generator=g).to(ctx.torch_device, _dtype(ctx))
    if case["mode"] == "fwd+bwd":
        x.requires_grad_()

    def run():
        if case["mode"] == "fwd":
            with torch.no_grad():
                f(x)
        else:
            torch.autograd.grad(f(x), (x, A, B), gy)
        ctx.sync()
    benchmark.extra_info.update(case)
    benchmark.pedantic(run, rounds=_rounds(ctx, M), warmup_rounds=1, iterations=1)
    if case["impl"] == "ours" and ctx.device == "cpu":  # scratch of the last kernel call vs the fp32 weight
        from forge_rt.kernels import qlora_cpu
        benchmark.extra_info["transient_frac"] = qlora_cpu.last_transient_bytes() / (N * K * 4)


def _ce_inputs(case, device):
    g = torch.Generator().manual_seed(0)
    V, H, rows, seq = case["V"], case["H"], case["rows"], case["seq"]
    hidden = torch.randn(rows, seq, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device).requires_grad_(case["head"] == "trained")
    labels = torch.randint(0, V, (rows, seq), generator=g)
    labels[:, : round(seq * 0.76)] = -100  # the demo job: the last 24% of a row is the labelled response
    return hidden, weight, labels.to(device)


def test_linear_ce(benchmark, ctx, case):
    hidden, weight, labels = _ce_inputs(case, ctx.torch_device)
    V = case["V"]
    loss = {"stock": lambda: F.cross_entropy((hidden @ weight.T).float().reshape(-1, V), labels.reshape(-1)),
            "fused": lambda: ops.linear_cross_entropy(hidden, weight, labels)}[case["impl"]]
    leaves = (hidden, weight) if case["head"] == "trained" else (hidden,)

    def run():
        torch.autograd.grad(loss(), leaves)
        ctx.sync()
    benchmark.extra_info.update(case)
    if ctx.device == "cpu":  # the most bytes torch held at once during one forward + backward
        from forge_rt.testing import peak_bytes
        benchmark.extra_info["peak_mib"] = peak_bytes(run) / 2**20
    benchmark.pedantic(run, rounds=ctx.pick(1, 3, 5), warmup_rounds=1, iterations=1)


def _qlora_rows(runs: list[dict]) -> list[dict]:
    t = {(e["N"], e["K"], e["M"], e["mode"], e["impl"]): (b["stats"]["min"] * 1e3, e)
         for b in runs if (e := b["extra_info"]).get("N")}
    rows = []
    for (N, K, M, mode, impl), (ms, e) in t.items():
        if impl != "ours":
            continue
        case = f"qlora {mode} {N}x{K} M={M}"
        for base, label in (("dense", "dense"), ("bnb", "bitsandbytes")):
            if (N, K, M, mode, base) in t:
                rows.append(row("kernels", case, ms, "ms", baseline=label, baseline_value=t[(N, K, M, mode, base)][0]))
        if "transient_frac" in e:
            rows.append(row("kernels", case + " scratch", 100 * e["transient_frac"], "% of fp32 W"))
    return rows


def _ce_rows(runs: list[dict]) -> list[dict]:
    t = {(b["extra_info"]["impl"], b["extra_info"]["head"]): (b["stats"]["min"] * 1e3, b["extra_info"])
         for b in runs if "head" in b["extra_info"]}
    rows = []
    for head in ("frozen", "trained"):
        (ms, fused), (base_ms, stock) = t[("fused", head)], t[("stock", head)]
        rows.append(row("kernels", f"linear+CE {head} head", ms, "ms", baseline="stock loss", baseline_value=base_ms))
        if "peak_mib" in fused:
            rows.append(row("kernels", f"linear+CE {head} head: peak", fused["peak_mib"], "MiB", baseline="stock loss",
                            baseline_value=stock["peak_mib"]))
    return rows


def run(ctx) -> list[dict]:
    import sys
    runs = run_pytest(sys.modules[__name__], ctx)
    return _qlora_rows(runs) + _ce_rows(runs)
