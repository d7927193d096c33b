"""Fused NF4 LoRA linear (cpu backend) vs dense fp32 and vs bitsandbytes' CPU path, in one run, 2 threads.

    python -m pytest bench/bench_qlora.py --benchmark-json=bench/results/qlora.json -q
    python bench/bench_qlora.py bench/results/qlora.json     # markdown ratio table from that run

On a machine shared with other jobs, wall time mostly measures the scheduler. A per-core comparison
that is robust to that: FORGE_BENCH_THREADS=1 and --benchmark-timer=time.thread_time (with one thread
torch, MKL and forge_rt's OpenMP loops all run on the calling thread, so its CPU time is the work):

    FORGE_BENCH_THREADS=1 python -m pytest bench/bench_qlora.py --benchmark-timer=time.thread_time \
        --benchmark-json=bench/results/qlora_1thread_cputime.json -q

Cases: forward and forward+backward (grads of x, A, B), M in {1, 16, 1024},
(N, K) in {(2048, 2048), (5632, 2048), (2048, 5632)}, r = 16, double-quantized NF4 (QLoRA's default).
  ours  : forge_rt.ops.qlora_linear, cpu backend
  dense : x @ W.T + s * (x @ A.T) @ B.T with W fp32 (the unquantized model)
  bnb   : forward: bitsandbytes.functional.dequantize_4bit + matmul + LoRA;
          forward+backward: bitsandbytes.matmul_4bit (dequantize + matmul in both directions) + LoRA
The table uses each case's minimum time (the most stable statistic on a shared machine) and also
reports the kernel's scratch buffers as a fraction of the dequantized fp32 weight.
"""
from __future__ import annotations

import json
import os
import sys
from functools import lru_cache

SHAPES = ((2048, 2048), (5632, 2048), (2048, 5632))
MS = (1, 16, 1024)
RANK, SCALING = 16, 2.0
ROUNDS = {1: 50, 16: 20, 1024: 3}
THREADS = int(os.environ.get("FORGE_BENCH_THREADS", "2"))

if __name__ != "__main__":
    import pytest
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    from forge_rt import nf4, ops
    from forge_rt.kernels import qlora_cpu

    @lru_cache(maxsize=1)  # one weight shape alive at a time (5632 x 2048 fp32 is 46 MB)
    def weights(N: int, K: int):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(N, K, generator=g) / K**0.5
        w = nf4.quantize(W, double_quant=True)
        w.absmax_fp32()  # resolve double quantization once, as a loaded model would
        packed, state = w.to_bnb()
        A = (torch.randn(RANK, K, generator=g) / K**0.5).requires_grad_()
        B = (torch.randn(N, RANK, generator=g) / RANK**0.5).requires_grad_()
        return W, w, packed, state, A, B

    def lora(x, A, B):
        return SCALING * (x @ A.T) @ B.T

    def impl(name, W, w, packed, state, A, B):
        if name == "ours":
            return lambda x: ops.qlora_linear(x, w, A, B, SCALING)
        if name == "dense":
            return lambda x: x @ W.T + lora(x, A, B)
        if name == "bnb":
            def bnb_path(x):
                if torch.is_grad_enabled():
                    return bnb.matmul_4bit(x, packed.t(), quant_state=state) + lora(x, A, B)
                return x @ bnb.functional.dequantize_4bit(packed, state).T + lora(x, A, B)
            return bnb_path
        raise ValueError(name)

    @pytest.fixture(autouse=True)
    def threads(monkeypatch):
        monkeypatch.setenv("FORGE_RT_BACKEND", "cpu")
        before = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        yield
        torch.set_num_threads(before)

    @pytest.mark.parametrize("name", ["ours", "dense", "bnb"])
    @pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
    @pytest.mark.parametrize("M", MS)
    @pytest.mark.parametrize("N,K", SHAPES)
    def test_qlora_linear(benchmark, N, K, M, mode, name):
        W, w, packed, state, A, B = weights(N, K)
        f = impl(name, W, w, packed, state, A, B)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
        gy = torch.randn(M, N, generator=torch.Generator().manual_seed(2))
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return f(x)
        else:
            x.requires_grad_()

            def run():
                return torch.autograd.grad(f(x), (x, A, B), gy)
        benchmark.extra_info.update(N=N, K=K, M=M, mode=mode, impl=name, threads=THREADS)
        benchmark.pedantic(run, rounds=ROUNDS[M], warmup_rounds=1, iterations=1)
        if name == "ours":  # scratch of the last kernel call (backward_input in fwd+bwd) vs fp32 W
            benchmark.extra_info["transient_frac"] = qlora_cpu.last_transient_bytes() / (N * K * 4)


def table(path: str) -> str:
    """Markdown table of ratios from a --benchmark-json file of this bench."""
    runs = json.load(open(path))["benchmarks"]
    t = {}
    frac = {}
    for b in runs:
        e = b["extra_info"]
        t[(e["N"], e["K"], e["M"], e["mode"], e["impl"])] = b["stats"]["min"] * 1e3
        if "transient_frac" in e:
            frac[(e["N"], e["K"], e["M"])] = max(frac.get((e["N"], e["K"], e["M"]), 0), e["transient_frac"])
    lines = ["| N x K | M | fwd ours ms | fwd ours/dense | fwd bnb/ours | fwd+bwd ours ms "
             "| fwd+bwd ours/dense | fwd+bwd bnb/ours | scratch / fp32 W |",
             "|---|---|---|---|---|---|---|---|---|"]
    for N, K in SHAPES:
        for M in MS:
            row = [f"{N} x {K}", str(M)]
            for mode in ("fwd", "fwd+bwd"):
                ours = t.get((N, K, M, mode, "ours"))
                dense = t.get((N, K, M, mode, "dense"))
                bnbt = t.get((N, K, M, mode, "bnb"))
                row += [f"{ours:.2f}" if ours else "-",
                        f"{ours / dense:.2f}" if ours and dense else "-",
                        f"{bnbt / ours:.1f}" if ours and bnbt else "-"]
            f = frac.get((N, K, M))
            row.append(f"{100 * f:.1f}%" if f is not None else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(table(sys.argv[1]))
