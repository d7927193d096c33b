"""LoRA training steps (forward + backward, r = 16 on every projection), each configuration in its own process
so its peak memory is its own: stock PEFT on the fp32 model and over bitsandbytes 4-bit, forge_rt's NF4 +
fused kernels (alone, with paging, spilling), accelerate() over bitsandbytes. The full suite uses SmolLM2-135M
on prose (the trainer's memory modes against stock PEFT are the `memory` family).
Step time excludes the first (cold) step; peak memory is RSS sampled during the steps (CUDA: max allocated)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from forge_rt.bench.cases import have
from forge_rt.bench.record import row

ESTIMATE_S = {"tiny": 30, "quick": 75, "full": 600}
CONFIGS = {"stock fp32": dict(weights="fp32"), "stock bnb": dict(weights="bnb"),
           "accelerate over bnb": dict(weights="bnb", fused=True), "forge fused": dict(weights="nf4", fused=True),
           "forge fused + paging": dict(weights="nf4", fused=True, paging="compress"),
           "forge fused + spill": dict(weights="nf4", fused=True, paging="spill"),
           "stock fp32 + save_on_cpu": dict(weights="fp32", paging="save_on_cpu")}
FULL_ONLY = ("forge fused + spill", "stock fp32 + save_on_cpu")


def _workload(ctx) -> dict:
    return ctx.pick(dict(kind="tiny", layers=2, batch=2, seq=32, steps=2),
                    dict(kind="smollm2-shape", layers=4, batch=2, seq=128, steps=3),
                    dict(kind="smollm2", layers=30, batch=4, seq=256, steps=4))


def _prepare(cfg: dict, work: dict, device: str):
    import forge_rt
    from forge_rt.bench.models import build
    from forge_rt.testing import lora_model, to_bnb4bit
    model, ids = build(work["kind"], work["layers"], work["batch"], work["seq"])
    if cfg["weights"] == "bnb":
        to_bnb4bit(model)
    elif cfg["weights"] == "nf4":
        forge_rt.quantize_model(model)
    pm = lora_model(model.to(device))
    if cfg.get("fused"):
        forge_rt.accelerate(pm)
    return pm, ids.to(device)


def _paging(mode: str | None, spill_dir: str):
    import contextlib

    import forge_rt
    return {None: contextlib.nullcontext, "compress": lambda: forge_rt.paging(),
            "spill": lambda: forge_rt.paging(budget_bytes=64 << 20, spill_dir=spill_dir),
            "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu()}[mode]()


def _peak_sampler(device: str):
    """A started sampler of peak memory in MiB; call it to stop and read."""
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        return lambda: torch.cuda.max_memory_allocated() / 2**20
    page, peak, stop = os.sysconf("SC_PAGE_SIZE"), [0], threading.Event()

    def sample():
        while not stop.is_set():
            with open("/proc/self/statm") as fh:
                peak[0] = max(peak[0], int(fh.read().split()[1]) * page)
            time.sleep(0.005)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    return lambda: (stop.set(), th.join(), peak[0] / 2**20)[-1]


def child(name: str, work: dict, device: str) -> dict:
    """One configuration's steps, in this process (run through `python -m forge_rt.bench.cases.step`)."""
    cfg = CONFIGS[name]
    pm, ids = _prepare(cfg, work, device)
    times, peak = [], _peak_sampler(device)
    with tempfile.TemporaryDirectory(prefix="forge_rt-bench-spill-") as spill:
        for _ in range(work["steps"]):
            t0 = time.perf_counter()
            with _paging(cfg.get("paging"), spill):
                pm(input_ids=ids, labels=ids).loss.backward()
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            pm.zero_grad(set_to_none=True)
    return {"config": name, "step_s": statistics.median(times[1:] or times), "first_s": times[0], "peak_mib": peak(),
            "floor_s": _floor(pm, work)}


def _floor(pm, work: dict) -> float:
    """This step's FLOP floor on this machine (plan.choose.step_floor_seconds): every token labelled, no
    recomputation, r = 16, as the step above runs."""
    from forge_rt.plan.choose import step_floor_seconds
    from forge_rt.plan.estimate import Shapes
    from forge_rt.plan.probe import probe
    return step_floor_seconds(Shapes.from_config(pm.config), work["batch"], work["seq"], probe(), checkpointing=False,
                              labelled_fraction=1.0, lora_r=16)


def _spawn(args: list[str]) -> dict:
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-m", "forge_rt.bench.cases.step", *args], capture_output=True, text=True,
                         env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"step child {args[:2]} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def _configs(ctx) -> list[str]:
    names = [n for n in CONFIGS if ctx.suite == "full" or n not in FULL_ONLY]
    return [n for n in names if CONFIGS[n]["weights"] != "bnb" or have("bitsandbytes")]


def _ratio_rows(res: dict[str, dict], time_base: str, mem_base: str, family_case: str) -> list[dict]:
    rows = []
    for name, r in res.items():
        rows.append(row("step", f"{family_case} {name}: step", r["step_s"], "s", baseline=time_base,
                        baseline_value=res[time_base]["step_s"]))
        rows.append(row("step", f"{family_case} {name}: peak memory", r["peak_mib"], "MiB", baseline=mem_base,
                        baseline_value=res[mem_base]["peak_mib"]))
    return rows


def run(ctx) -> list[dict]:
    work, names = _workload(ctx), _configs(ctx)
    res = {}
    for i, name in enumerate(names):
        ctx.progress and ctx.progress.step(i, len(names), name)
        res[name] = _spawn(["--config", name, "--work", json.dumps(work), "--device", ctx.torch_device])
    case = f"{work['kind']} {work['layers']}L {work['batch']}x{work['seq']}"
    rows = _ratio_rows(res, "stock bnb" if "stock bnb" in res else "stock fp32", "stock fp32", case)
    fused = res["forge fused"]  # how far the default path is from the machine's matmul limit
    rows.append(row("step", f"{case} forge fused: step over its FLOP floor", fused["step_s"], "s", baseline="FLOP floor",
                    baseline_value=fused["floor_s"]))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="one step configuration, in its own process (internal)")
    ap.add_argument("--config", choices=list(CONFIGS), required=True)
    ap.add_argument("--work", required=True, help="JSON: kind, layers, batch, seq, steps")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps(child(a.config, json.loads(a.work), a.device)))
