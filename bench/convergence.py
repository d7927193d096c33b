"""Convergence study of the default job: held-out score and retention against training examples seen and
minutes, per learning rate and length, each run a whole `python -m forge_rt.train` with its own schedule.

  python bench/convergence.py --runs 40:4e-4,40:1e-3,80:1e-3 --json bench/results/convergence/study.json
  python bench/convergence.py --json bench/results/convergence/study.json --plot   # the figure only

A run is `STEPS:LR[:KEY=VALUE...]` (extra trainer flags, e.g. `40:1e-3:lora_r=8`; STEPS 0 trains --epochs;
'+' in a value stands for ',', e.g. `target_modules=q_proj+v_proj`); runs already in the record are skipped,
so the study can grow run by run. `--adopt SPEC=RUN_DIR` records a run already made with those flags (its
load averages from RUN_DIR.load when present). DP runs (`dp_epsilon=8:dp_batch=64`) record their privacy
figures and the examples their Poisson samples held (bench/results/privacy/dp_study.json). Each run evaluates 200 held-out demo rows in
llama.cpp (the trainer's default engine) and reads the base score from the evaluation cache. Minutes on
the plot are the run's own training and evaluation seconds; run it alone (the load average is recorded
beside each run), or read `steps * step_time_mean_s` from a run made alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from forge_rt.bench.env import environment, loadavg

KEEP = ("score_tuned", "exact_tuned", "field_acc_tuned", "valid_json_tuned", "score_base", "ppl_retention_base",
        "ppl_retention_tuned", "ppl_retention_change_pct", "retention_ok", "train_time_s", "eval_time_s",
        "total_time_s", "step_time_mean_s", "peak_rss_bytes_train")


DP_KEEP = ("epsilon_spent", "delta", "noise_multiplier", "clip", "expected_batch", "micro_batch", "steps",
           "clipped_fraction", "per_example_seconds")


def parse_run(spec: str) -> dict:
    steps, lr, *extra = spec.split(":")
    flags = {k: v.replace("+", ",") for k, v in (kv.split("=", 1) for kv in extra)}
    return {"name": spec, "max_steps": int(steps), "lr": float(lr), "flags": flags}


def command(run: dict, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "forge_rt.train", "--no-live", "--overwrite", "--output", str(out),
           "--max-steps", str(run["max_steps"]), "--lr", str(run["lr"])]
    for key, value in run["flags"].items():
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value == "" else [value])
    return cmd


def summary(run: dict, cmd: list[str], out: Path, loads: dict) -> dict:
    """The record of a finished run: its flags, command, load averages and what metrics.json says."""
    metrics = json.loads((out / "metrics.json").read_text())
    cfg, dp = metrics["config"], metrics.get("dp")
    seen = dp["examples_seen"] if dp else metrics["steps"] * cfg["batch_size"] * cfg["grad_accum"]
    return {**run, "command": " ".join(cmd[1:]), **loads, "examples_seen": seen,
            "epochs": seen / metrics["data"]["n_train"],
            "eval_base_cached": (metrics.get("eval") or {}).get("base_cached"),
            **{k: metrics.get(k) for k in KEEP}, **({"dp": {k: dp.get(k) for k in DP_KEEP}} if dp else {})}


def train(run: dict, out: Path) -> dict:
    cmd = command(run, out)
    before = loadavg()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return summary(run, cmd, out, {"loadavg_before": before, "loadavg_after": loadavg()})


def adopt(spec_dir: str) -> dict:
    """A run made by hand with SPEC's flags (SPEC=RUN_DIR), recorded as if this script had run it."""
    spec, out = spec_dir.rsplit("=", 1)
    run, out = parse_run(spec), Path(out)
    load_file = out.with_suffix(".load")
    loads = {"uptime_before_after": load_file.read_text().splitlines()} if load_file.exists() else {}
    return summary(run, command(run, out), out, loads)


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_lr: dict[str, list[dict]] = {}
    for r in record["runs"]:
        label = r.get("label") or f"lr {r['lr']:g}" + "".join(f", {k}={v}" for k, v in r["flags"].items())
        by_lr.setdefault(label, []).append(r)
    for label, runs in sorted(by_lr.items()):
        runs.sort(key=lambda r: r["max_steps"])
        minutes = [(r["train_time_s"] + r["eval_time_s"]) / 60 for r in runs]
        ax1.plot(minutes, [r["score_tuned"] for r in runs], "o-", label=label)
        ax2.plot([r["epochs"] for r in runs], [r["ppl_retention_change_pct"] for r in runs], "o-", label=label)
    ax1.set(xlabel="minutes (training + evaluation)", ylabel="held-out composite (200 rows)",
            title="score vs minutes")
    ax2.axhline(10, color="grey", ls="--", lw=0.8)
    ax2.set(xlabel="epochs of the 623 training rows", ylabel="retention perplexity change, %",
            title="retention (guard: +10%)")
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * ((len(by_lr) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)


def save(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="", help="comma-separated STEPS:LR[:KEY=VALUE...]")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/forge_rt_convergence"))
    p.add_argument("--plot", action="store_true", help="write the figure beside the record")
    p.add_argument("--adopt", action="append", default=[], help="SPEC=RUN_DIR: record a run already made")
    a = p.parse_args(argv)
    record = json.loads(a.json.read_text()) if a.json.exists() else {"environment": environment(), "runs": []}
    done = {r["name"] for r in record["runs"]}
    for spec_dir in a.adopt:
        if spec_dir.rsplit("=", 1)[0] not in done:
            record["runs"].append(adopt(spec_dir))
            save(record, a.json)
    for spec in filter(None, a.runs.split(",")):
        run = parse_run(spec)
        if run["name"] in done:
            continue
        result = train(run, a.workdir / spec.replace(":", "_").replace("=", "-"))
        record["runs"].append(result)
        save(record, a.json)
        print(f"{spec}: score {result['score_tuned']} retention {result['ppl_retention_change_pct']:+.1f}% "
              f"train {result['train_time_s']:.0f} s eval {result['eval_time_s']:.0f} s", flush=True)
    if a.plot and record["runs"]:
        plot(record, a.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
