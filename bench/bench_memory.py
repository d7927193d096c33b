"""Memory against the strongest stock setting: stock PEFT (fp32 base) with and without gradient
checkpointing vs forge_rt's memory modes, each configuration trained in its own process (its peak is
its own), same data, seed and steps. Also long context (batch 1, one row of prose of N tokens).

    python bench/bench_memory.py [--steps 4] [--batch-size 8] [--long 2048,8192] [--out bench/results/memory.json]

Per configuration: mean step time (first step excluded), peak RSS while training, the RSS before the
first step (fixed costs: runtime, weights, LoRA + Adam) and their difference (activation memory), the
planner's predicted peak, and the loss of every step. Ratios are taken within the run."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO = {"stock": ["--no-fused"], "stock_gc": ["--no-fused", "--grad-checkpointing"],
        "forge_speed": ["--memory", "speed"], "forge_auto": ["--memory", "auto"], "forge_min": ["--memory", "min"]}
LONG = {"stock_gc": ["--no-fused", "--grad-checkpointing"], "forge_min": ["--memory", "min"]}


def run_one(name: str, flags: list[str], common: list[str], workdir: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, "-m", "forge_rt.train", "--output", str(out), "--no-eval", "--no-live",
           "--checkpoint-every", "0", "--log-every", "1", *common, *flags]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    plan = metrics.get("memory_plan") or {}
    timed = recs[1:] if len(recs) > 1 else recs
    peak = max(r["peak_rss_bytes"] for r in recs)
    pre = plan.get("measured_pre_step") or recs[0]["rss_bytes"]
    return {"step_time_s": sum(r["step_time_s"] for r in timed) / len(timed), "peak_rss_bytes": peak,
            "pre_step_rss_bytes": pre, "activation_bytes": peak - pre, "losses": [r["loss"] for r in recs],
            "predicted_peak_bytes": plan.get("predicted_peak"), "plan": plan.get("reason"),
            "checkpointing": plan.get("checkpointing")}


def long_data(path: Path, tokens: int) -> Path:
    """One prompt/completion row whose completion is `tokens` tokens of prose (SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer
    from forge_rt.testing import prose_ids
    from forge_rt.train.model import default_gguf_path
    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = tok.decode(prose_ids(tok, 1, tokens)[0])
    path.write_text(json.dumps({"prompt": "Continue.", "completion": text}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--long", default="2048,8192", help="long-context token counts ('' to skip)")
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    only = set(args.only.split(",")) if args.only else None
    res: dict = {"demo": {}, "long": {}}
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size)]
        for name, flags in DEMO.items():
            if only is None or name in only:
                res["demo"][name] = run_one(name, flags, common, Path(tmp))
        for n in [int(v) for v in args.long.split(",") if v]:
            data = long_data(Path(tmp) / f"long{n}.jsonl", n)
            common = ["--max-steps", "3", "--batch-size", "1", "--max-len", str(n + 64), "--data", str(data)]
            res["long"][n] = {name: run_one(f"{name}_{n}", flags, common, Path(tmp)) for name, flags in LONG.items()
                              if only is None or name in only}
    res["settings"] = {"steps": args.steps, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                       # Other work on the machine skews wall times: record the 1-min load around the run.
                       "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))


def table(res: dict) -> str:
    gib = 2 ** 30
    lines = ["| config | step s | peak GiB | pre-step GiB | activations GiB | predicted GiB |", "|---|---|---|---|---|---|"]
    for group, runs in (("demo", res["demo"]), *((f"{n} tokens", r) for n, r in res["long"].items())):
        for name, r in runs.items():
            if "error" in r:
                lines.append(f"| {group}: {name} | failed: {r['error']} | | | | |")
                continue
            pred = f"{r['predicted_peak_bytes'] / gib:.2f}" if r.get("predicted_peak_bytes") else "-"
            lines.append(f"| {group}: {name} | {r['step_time_s']:.2f} | {r['peak_rss_bytes'] / gib:.2f} | "
                         f"{r['pre_step_rss_bytes'] / gib:.2f} | {r['activation_bytes'] / gib:.2f} | {pred} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
