"""Overhead of the memory monitor on a training-step-like workload, on vs off in one run.

    python bench/bench_monitor.py [--steps 5] [--rounds 12] [--size 512] [--json out.json]

A "step" is forward-like matmuls, backward-like matmuls and an in-place update, with the three phase
marks a trainer makes. Rounds alternate off/on so drift of a shared machine hits both alike; the
result is the ratio of median step times (on/off). The cost of one sample, measured directly, times
the sampling rate gives the same overhead from first principles (robust on a busy shared machine,
where the step-time ratio carries the other processes' noise).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from forge_rt.monitor import MemoryMonitor


def make_step(size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=g)
    w = [torch.randn(size, size, generator=g) / size ** 0.5 for _ in range(3)]

    def step(mark):
        mark("forward")
        h = x
        acts = []
        for wi in w:
            acts.append(h)
            h = torch.tanh(h @ wi)
        mark("backward")
        grad = torch.ones_like(h)
        grads = []
        for wi, a in zip(reversed(w), reversed(acts)):
            grads.append(a.T @ grad)
            grad = grad @ wi.T
        mark("optimizer")
        for wi, gi in zip(reversed(w), grads):
            wi.sub_(gi, alpha=1e-6)
    return step


def timed_steps(step, mark, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(mark)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--rounds", type=int, default=12, help="off/on round pairs")
    ap.add_argument("--size", type=int, default=512, help="matrix size of the step's matmuls")
    ap.add_argument("--interval", type=float, default=0.1, help="sampling interval (s)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    step = make_step(args.size)
    timed_steps(step, lambda p: None, 3)  # warm up threads and caches
    off, on, pair_ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            off += timed_steps(step, lambda p: None, args.steps)
            mon = MemoryMonitor(interval=args.interval, out_path=f"{tmp}/round{r}").start()
            counter = iter(range(10 ** 9))
            on += timed_steps(step, lambda p: mon.mark(p, next(counter) // 3), args.steps)
            mon.stop()
            n_samples = mon.view.n_samples
            pair_ratios.append(statistics.median(on[-args.steps:]) / statistics.median(off[-args.steps:]))
        # Direct cost of one sample (read all sources, write the line, update the view).
        mon = MemoryMonitor(interval=3600, out_path=f"{tmp}/direct").start()
        t0 = time.perf_counter()
        for _ in range(2000):
            mon._take()
        sample_s = (time.perf_counter() - t0) / 2000
        t0 = time.perf_counter()
        for i in range(2000):
            mon.mark("forward", i)
        mark_s = (time.perf_counter() - t0) / 2000
        mon.stop()
    result = {
        "workload": f"3 fwd + 6 bwd matmuls {args.size}^2 fp32 + update, 3 marks/step",
        "steps_per_mode": len(off),
        "median_step_off_s": statistics.median(off),
        "median_step_on_s": statistics.median(on),
        "ratio_on_off": statistics.median(on) / statistics.median(off),
        "mean_ratio_on_off": statistics.fmean(on) / statistics.fmean(off),
        "median_of_round_ratios": statistics.median(pair_ratios),
        "samples_last_round": n_samples,
        "one_sample_us": sample_s * 1e6,
        "sampler_cpu_fraction_at_interval": sample_s / args.interval,
        "one_mark_us": mark_s * 1e6,
        "marks_fraction_of_median_off_step": 3 * mark_s / statistics.median(off),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
