"""The 7B-shaped bench: a RANDOMLY initialised Llama-2-7B-shaped bf16 checkpoint (tools/make_7b_checkpoint.py;
it measures memory and time, not quality), then, each in its own process:

  load   forge_rt's streaming NF4 load (peak RSS, seconds); stock `from_pretrained` in bf16 then quantizing
         needs at least the bf16 weights, reported from the arithmetic;
  train  3 LoRA steps (r=16, all linear layers, 512 tokens, batch 1) through `python -m forge_rt.train` with
         the memory planner under a 10G budget;
  stock  the same steps with stock PEFT over bitsandbytes 4-bit loading and gradient checkpointing (its peak,
         or how it failed).

    python bench/bench_7b.py [--workdir /big/disk] [--out bench/results/bench_7b.json]
    python bench/bench_7b.py --tiny      # a 2-layer shape, to check the script (seconds)

The multi-GB checkpoint and run directories are deleted at the end, whatever happens."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4"]
RANDOM_TEXT = "The pump log lists pressure, temperature and vibration readings for each shift. "


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def phase_load(model: Path, steps: int, seq: int) -> dict:
    import torch
    from forge_rt.models import load_model
    t = time.perf_counter()
    load_model(model, dtype=torch.float32, nf4=True)
    weights = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    return {"seconds": time.perf_counter() - t, "peak_rss_bytes": _peak(),
            "stock_bf16_weights_bytes": weights}  # from_pretrained(bf16) holds these before quantizing


def _data(path: Path, seq: int) -> Path:
    rows = [{"prompt": "Summarise the log.", "completion": RANDOM_TEXT * (seq // 12)} for _ in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def phase_train(model: Path, steps: int, seq: int) -> dict:
    from forge_rt.cli import train
    run, data = model.parent / "run", _data(model.parent / "data.jsonl", seq)
    rc = train.main(["--model", str(model), "--data", str(data), "--output", str(run), "--no-eval", "--no-live",
                     "--max-steps", str(steps), "--batch-size", "1", "--max-len", str(seq), "--lora-r", "16",
                     "--checkpoint-every", "0", "--memory-budget", "10G", "--overwrite"])
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    m = json.loads((run / "metrics.json").read_text()) if rc == 0 else {}
    plan = m.get("memory_plan") or {}
    return {"rc": rc, "step_times_s": [r["step_time_s"] for r in recs], "peak_rss_bytes": _peak(),
            "pre_step_rss_bytes": m.get("pre_step_rss_bytes"), "peak_rss_bytes_train": m.get("peak_rss_bytes_train"),
            "plan": {k: plan.get(k) for k in ("mode", "checkpointing", "reason", "predicted_peak", "predicted_step_s", "parts", "heap_trims", "rss_cap")}}


def phase_stock(model: Path, steps: int, seq: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(model, quantization_config=q, dtype=torch.float32)
    load_s, load_peak = time.perf_counter() - t, _peak()
    base.gradient_checkpointing_enable()
    base.enable_input_require_grads()
    peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft.train()  # from_pretrained returns eval mode, where HF skips gradient checkpointing
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, base.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        peft(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"rc": 0, "load_s": load_s, "load_peak_rss_bytes": load_peak, "step_times_s": times,
            "peak_rss_bytes": _peak()}


PHASES = {"load": phase_load, "train": phase_train, "stock": phase_stock}


def run_phase(name: str, model: Path, args) -> dict:
    """One phase in a child process: its peak RSS is its own; a crash (e.g. killed for memory) is reported."""
    cmd = [sys.executable, __file__, "--phase", name, "--model", str(model), "--steps", str(args.steps),
           "--seq", str(args.seq)]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode != 0 or not last.startswith("{"):
        return {"rc": out.returncode, "failed": f"exit {out.returncode} (negative: killed by signal)"}
    return json.loads(last)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=sorted(PHASES))
    p.add_argument("--model", type=Path)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="a 2-layer shape, to check the script")
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes (~14 GB at 7B)")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_7b.json")
    args = p.parse_args(argv)
    if args.phase:  # child: one phase, its result as the last line of stdout
        print(json.dumps(PHASES[args.phase](args.model, args.steps, args.seq)), flush=True)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench7b-", dir=args.workdir))
    try:
        model = work / "model"
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_7b_checkpoint.py"), str(model),
                        *(TINY if args.tiny else [])], check=True)
        load_before = os.getloadavg()
        res = {"weights": "RANDOM (Llama-2-7B shape)" if not args.tiny else "RANDOM (tiny shape)",
               **{name: run_phase(name, model, args) for name in PHASES},
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.tiny:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    for name in PHASES:
        r = res[name]
        print(f"{name:6s} peak RSS {r.get('peak_rss_bytes', 0) / 2**30:6.2f} GiB  "
              f"{r.get('failed') or r.get('step_times_s') or round(r.get('seconds', 0), 1)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
