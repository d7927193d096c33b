"""End-to-end training bench: forge_rt's default path (NF4 + fused kernels + activation paging) vs
stock PEFT LoRA on the full-precision model (`--no-fused --no-paging`), same data, seed and steps,
measured in one run. Each configuration trains in its own process so peak memory is its own.

    python bench/bench_train.py [--steps 6] [--batch-size 8] [--out bench/results/bench_train.json]

Reports the mean step time (first step excluded as warm-up) and the peak RSS while training, and
their ratios default / baseline."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {"default": [], "fused_no_paging": ["--no-paging"], "baseline": ["--no-fused", "--no-paging"]}


def run_one(name: str, flags: list[str], args, workdir: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, "-m", "forge_rt.train", "--output", str(out), "--no-eval", "--no-live",
           "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--checkpoint-every", "0",
           "--log-every", "1", *flags, *args.extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = recs[1:] if len(recs) > 1 else recs
    return {"step_time_s": sum(r["step_time_s"] for r in timed) / len(timed),
            "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in recs),
            "final_loss": recs[-1]["loss"], "steps": len(recs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_train.json"))
    p.add_argument("extra", nargs="*", help="more train flags for both runs (after --)")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        res = {name: run_one(name, flags, args, Path(tmp)) for name, flags in CONFIGS.items()}
    d, b = res["default"], res["baseline"]
    res["step_time_ratio_default_over_baseline"] = d["step_time_s"] / b["step_time_s"]
    res["peak_rss_ratio_default_over_baseline"] = d["peak_rss_bytes"] / b["peak_rss_bytes"]
    res["settings"] = {"steps": args.steps, "batch_size": args.batch_size, "extra": args.extra,
                       "cpus": os.cpu_count(),
                       # Other work on the machine skews wall times: record the 1-min load around the run.
                       "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'':16s} {'step s':>8s} {'tok/s':>8s} {'peak RSS GiB':>13s}")
    for name in CONFIGS:
        r = res[name]
        print(f"{name:16s} {r['step_time_s']:8.2f} {r['tokens_per_s']:8.0f} {r['peak_rss_bytes'] / 2**30:13.2f}")
    print(f"step-time ratio default/baseline: {res['step_time_ratio_default_over_baseline']:.2f}; "
          f"peak-memory ratio: {res['peak_rss_ratio_default_over_baseline']:.2f}  -> {args.out}")


if __name__ == "__main__":
    main()
