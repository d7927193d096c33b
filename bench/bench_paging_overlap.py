"""How much CPU a training step leaves for a codec running beside it (the case for overlap).

  python bench/bench_paging_overlap.py [--batch 4 --tokens 256 --steps 2] [--json bench/results/paging_overlap.json]

Runs SmolLM2 LoRA steps (fp32, torch on 2 threads) alone, then with a background thread compressing
real saved activations non-stop with forge_rt's codec, at normal priority and at SCHED_IDLE (it
only gets a core the step leaves idle). Prints the step time against alone and the throughput the
background codec reached: what compression overlapped with compute could hide on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

from forge_rt.bench.models import build, capture_saved
from forge_rt.testing import lora_model


def steps(model, ids, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_background(model, ids, n, saved, codec, idle):
    stop, done = threading.Event(), [0]

    def work():
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        while not stop.is_set():
            for t in saved:
                if stop.is_set():
                    break
                codec.encode(t.view(-1))
                done[0] += t.numel() * t.element_size()

    th = threading.Thread(target=work, daemon=True)
    t0 = time.perf_counter()
    th.start()
    step = steps(model, ids, n)
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join()
    return step, done[0] / elapsed / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    from forge_rt.pager import TensorCodec
    torch.set_num_threads(2)
    model, ids = build("smollm2", 30, a.batch, a.tokens)
    model = lora_model(model)
    saved = [t for t in capture_saved(model, ids) if t.numel() * t.element_size() >= 1 << 20][:200]
    model.zero_grad(set_to_none=True)
    codec = TensorCodec(threads=1, min_ratio=0.0)
    t0, n = time.perf_counter(), 0
    for t in saved:
        codec.encode(t.view(-1))
        n += t.numel() * t.element_size()
    alone_gbs = n / (time.perf_counter() - t0) / 1e9
    base = steps(model, ids, a.steps + 1)
    rows = [dict(case="step alone", step_s=base, codec_gbs=None), dict(case="codec alone (1 thread)", step_s=None,
                                                                      codec_gbs=alone_gbs)]
    for idle in (False, True):
        s, gbs = with_background(model, ids, a.steps, saved, codec, idle)
        rows.append(dict(case=f"step + codec thread ({'SCHED_IDLE' if idle else 'normal priority'})", step_s=s,
                         codec_gbs=gbs))
    print("\n| case | step s | x alone | background codec GB/s |\n|---|---|---|---|")
    for r in rows:
        st = f"{r['step_s']:.2f} | {r['step_s'] / base:.2f}" if r["step_s"] else "– | –"
        print(f"| {r['case']} | {st} | {r['codec_gbs']:.2f} |" if r["codec_gbs"] is not None else f"| {r['case']} | {st} | – |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(cmd=" ".join(sys.argv), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
