"""Memory against the strongest stock setting: `python -m forge_rt.train` on the demo job with stock PEFT
(fp32 base) with and without gradient checkpointing, and forge_rt in each memory mode; then long context
(batch 1, one row of N tokens of prose) for stock + checkpointing and forge_rt `min`. Each configuration
trains in its own process, so its peak is its own. Per configuration: mean step time (first step excluded),
peak RSS while training, the RSS before the first step (runtime, weights, LoRA + Adam) and the difference
(activation memory), the planner's predicted peak and the loss of every step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from forge_rt.bench.record import row

ESTIMATE_S = {"tiny": 60, "quick": 700, "full": 1800}
DEMO = {"stock": ["--no-fused", "--no-paging"], "stock + checkpointing": ["--no-fused", "--grad-checkpointing"],
        "forge speed": ["--memory", "speed"], "forge auto": ["--memory", "auto"], "forge min": ["--memory", "min"]}
LONG = {"stock + checkpointing": ["--no-fused", "--grad-checkpointing"], "forge min": ["--memory", "min"]}
LONG_TOKENS = {"tiny": (), "quick": (2048,), "full": (2048, 8192)}


def train(name: str, flags: list[str], common: list[str], workdir: Path) -> dict:
    out = workdir / name.replace(" ", "_").replace("+", "p")
    cmd = [sys.executable, "-m", "forge_rt.train", "--output", str(out), "--no-eval", "--no-live",
           "--checkpoint-every", "0", "--log-every", "1", *common, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    plan = metrics.get("memory_plan") or {}
    timed = recs[1:] or recs
    peak = max(r["peak_rss_bytes"] for r in recs)
    pre = metrics["pre_step_rss_bytes"]  # the RSS before the first step, for every configuration
    return {"step_s": sum(r["step_time_s"] for r in timed) / len(timed), "peak": peak, "pre_step": pre,
            "losses": [r["loss"] for r in recs], "predicted": plan.get("predicted_peak"), "plan": plan.get("reason")}


def long_data(path: Path, tokens: int) -> Path:
    """One prompt/completion row whose completion is `tokens` tokens of prose (SmolLM2's tokenizer)."""
    from forge_rt.testing import prose_ids
    from forge_rt.models import load_tokenizer
    tok = load_tokenizer()
    path.write_text(json.dumps({"prompt": "Continue.", "completion": tok.decode(prose_ids(tok, 1, tokens)[0])}) + "\n")
    return path


def _rows(res: dict, group: str, base: str) -> list[dict]:
    rows, b = [], res.get(base, {})
    for name, r in res.items():
        if "error" in r:
            rows.append(row("memory", f"{group} {name}: failed", 0.0, "-", error=r["error"]))
            continue
        mib = 2 ** 20
        rows.append(row("memory", f"{group} {name}: step time", r["step_s"], "s", baseline=base,
                        baseline_value=b.get("step_s")))
        rows.append(row("memory", f"{group} {name}: peak RSS", r["peak"] / mib, "MiB", baseline=base,
                        baseline_value=(b.get("peak") or 0) / mib, pre_step_mib=r["pre_step"] / mib,
                        activations_mib=(r["peak"] - r["pre_step"]) / mib,
                        predicted_mib=(r["predicted"] or 0) / mib or None, plan=r["plan"], losses=r["losses"]))
    return rows


def run(ctx) -> list[dict]:
    res = {}
    steps = "2" if ctx.suite == "tiny" else "4"
    for i, (name, flags) in enumerate(DEMO.items()):
        ctx.progress and ctx.progress.step(i, len(DEMO), f"demo job, {name}")
        res[name] = train(name, flags, ["--max-steps", steps, "--batch-size", "8"], ctx.workdir)
    rows = _rows(res, "demo 8x", "stock + checkpointing")
    for n in LONG_TOKENS[ctx.suite]:
        data = long_data(ctx.workdir / f"long{n}.jsonl", n)
        steps = "3" if n <= 2048 else "2"  # 8192 tokens: minutes per step here; one timed step after the first
        common = ["--max-steps", steps, "--batch-size", "1", "--max-len", str(n + 64), "--data", str(data)]
        long_res = {}
        for name, flags in LONG.items():
            ctx.progress and ctx.progress.step(0, 1, f"{n} tokens, {name}")
            long_res[name] = train(f"{name} {n}", flags, common, ctx.workdir)
        rows += _rows(long_res, f"{n} tokens", "stock + checkpointing")
    return rows
