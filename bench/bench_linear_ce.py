"""Fused linear + cross-entropy vs the stock LM-head loss, forward + backward, time and peak memory.

    python -m pytest bench/bench_linear_ce.py --benchmark-json=bench/results/linear_ce.json -q
    python bench/bench_linear_ce.py bench/results/linear_ce.json     # markdown table from that run

SmolLM2-135M's head (V = 49152, H = 576, fp32, CPU) on the demo job's batch: N = 8 x 144 tokens, the last
24% of each row labelled (the response), the rest -100.
  stock : logits of all N tokens, then cross_entropy(ignore_index=-100), as HF's ForCausalLMLoss does
  fused : forge_rt.ops.linear_cross_entropy (cpu backend: labelled rows only, in chunks)
each with a frozen head (LoRA) and a trained one (full fine-tuning, tied embeddings). Time: min over the
rounds; peak: the most bytes torch had allocated at once during one more forward + backward (profiler
memory events), beyond the inputs. Benchmarks must run alone on this machine (see design.md).
FORGE_BENCH_SIZE=tiny shrinks every dimension, for a smoke run.
"""
from __future__ import annotations

import itertools
import json
import os
import sys

TINY = os.environ.get("FORGE_BENCH_SIZE") == "tiny"
V, H, ROWS, SEQ = (512, 32, 2, 16) if TINY else (49152, 576, 8, 144)
LABELLED = 0.24
THREADS = int(os.environ.get("FORGE_BENCH_THREADS", "2"))
ROUNDS = 1 if TINY else 5


def peak_bytes(fn) -> int:
    """The most bytes torch held on the CPU at once while fn ran, counting only what fn allocated
    (torch.profiler memory events, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0)


if __name__ != "__main__":
    import pytest
    import torch
    import torch.nn.functional as F

    from forge_rt import ops

    def inputs(train_head: bool):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(ROWS, SEQ, H, generator=g).requires_grad_()
        weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(train_head)
        labels = torch.randint(0, V, (ROWS, SEQ), generator=g)
        labels[:, : round(SEQ * (1 - LABELLED))] = -100
        return hidden, weight, labels

    def stock(hidden, weight, labels):
        return F.cross_entropy((hidden @ weight.T).float().reshape(-1, V), labels.reshape(-1), ignore_index=-100)

    def fused(hidden, weight, labels):
        return ops.linear_cross_entropy(hidden, weight, labels)

    @pytest.fixture(autouse=True)
    def threads(monkeypatch):
        monkeypatch.setenv("FORGE_RT_BACKEND", "cpu")
        before = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        yield
        torch.set_num_threads(before)

    @pytest.mark.parametrize("head", ["frozen", "trained"])
    @pytest.mark.parametrize("name", ["stock", "fused"])
    def test_linear_ce(benchmark, name, head):
        hidden, weight, labels = inputs(head == "trained")
        loss_fn = {"stock": stock, "fused": fused}[name]
        leaves = (hidden, weight) if head == "trained" else (hidden,)

        def run():
            return torch.autograd.grad(loss_fn(hidden, weight, labels), leaves)

        benchmark.extra_info.update(V=V, H=H, N=ROWS * SEQ, labelled=LABELLED, impl=name, head=head,
                                    threads=THREADS, peak_bytes=peak_bytes(run))
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def table(path: str) -> str:
    """Markdown table (fused vs stock per head mode) from a --benchmark-json file of this bench."""
    runs = {(b["extra_info"]["impl"], b["extra_info"]["head"]): b for b in json.load(open(path))["benchmarks"]}
    lines = ["| head | stock ms | fused ms | fused / stock time | stock peak MiB | fused peak MiB | fused / stock peak |",
             "|---|---|---|---|---|---|---|"]
    for head in ("frozen", "trained"):
        s, f = runs.get(("stock", head)), runs.get(("fused", head))
        if s and f:
            ts, tf = s["stats"]["min"] * 1e3, f["stats"]["min"] * 1e3
            ps, pf = s["extra_info"]["peak_bytes"] / 2**20, f["extra_info"]["peak_bytes"] / 2**20
            lines.append(f"| {head} | {ts:.1f} | {tf:.1f} | {tf / ts:.2f} | {ps:.1f} | {pf:.1f} | {pf / ps:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(table(sys.argv[1]))
