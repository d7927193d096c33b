"""Held-out evaluation speed, old path (HF generate over the fused NF4 model) vs the llama.cpp path the trainer
uses by default (--eval-engine auto): the same base model (SmolLM2-135M-Instruct as trained: NF4), the demo's
held-out rows, greedy, max_new_tokens 64. The two paths run interleaved in one process (llama.cpp cold: the
gguf-base export included; PyTorch; llama.cpp warm: gguf-base from the cache), so a machine shared with other
work slows both alike; `uptime` load averages are recorded around each phase, and CPU seconds beside wall seconds.

    .venv/bin/python bench/eval_speed.py [--limit N] [--run RUN] [--out bench/results/eval_speed.json]

With --run, the model is that run's tuned model (the base as trained + its adapter; llama.cpp gets the adapter as
a gguf-lora), as the trainer's tuned evaluation sees it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(fn, what: str):
    t, c, load = time.perf_counter(), time.process_time(), _load()
    print(f"bench: {what} (load {load}) ...", flush=True)
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - c, 2),
                 "load_before": load, "load_after": _load()}


def _gen_record(tok, rows, answers, timing, extra=None) -> dict:
    from forge_rt.eval.score import score_examples
    n_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    res = score_examples(rows, answers)
    return {**timing, **(extra or {}), "tokens": n_tokens, "tokens_per_s": round(n_tokens / timing["wall_s"], 2),
            "tokens_per_cpu_s": round(n_tokens / timing["cpu_s"], 2),
            **{k: res[k] for k in ("score", "exact", "field_acc", "valid_json", "n")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N held-out rows only")
    ap.add_argument("--run", default=None, help="a trained run: its tuned model (base + adapter) instead of the base")
    ap.add_argument("--out", default="bench/results/eval_speed.json")
    args = ap.parse_args(argv)
    os.environ["FORGE_RT_CACHE"] = tempfile.mkdtemp(prefix="forge_rt-bench-cache-")  # cold: nothing cached yet

    import torch
    from types import SimpleNamespace
    from forge_rt import data
    from forge_rt.core.dist import SINGLE
    from forge_rt.eval.engine import llamacpp_answers, prompt_ids
    from forge_rt.eval.hf import generate_answers, retention_perplexity
    from forge_rt.models import build_model, load_model, load_run
    from forge_rt.train.config import TrainConfig
    from forge_rt.train.evaluation import RunEval

    cfg = TrainConfig()
    paths = data.demo_paths()
    rows = data.load_examples(paths["eval"])[: args.limit]
    retention = data.read_text(paths["retention"], "retention text", "--retention-text")
    if args.run:
        model, tok, _ = load_run(args.run)
        model.eval()
    else:
        base, tok = load_model(cfg.model, nf4=True)
        model = build_model(base, cfg.lora_spec()).eval()  # LoRA B = 0: the base model, as the trainer's base eval sees it
    lora = None
    ev = RunEval(cfg, SimpleNamespace(evals=rows, retention=retention, prompt=SimpleNamespace(name="model")), SINGLE)
    ids = prompt_ids(tok, rows)
    if args.run:
        lora, lora_export = _timed(lambda: ev.lora_gguf(model, Path(tempfile.mkdtemp(prefix="forge_rt-bench-"))),
                                   "gguf-lora export")
    record = {"command": "python bench/eval_speed.py" + (f" --limit {args.limit}" if args.limit else "")
              + (f" --run {args.run}" if args.run else ""),
              "model": "SmolLM2-135M-Instruct (shipped Q4_1 GGUF) as trained: NF4"
              + (" + the run's adapter (gguf-lora f32)" if args.run else ""), "n": len(rows),
              "max_new_tokens": cfg.max_new_tokens, "parallel": cfg.eval_batch_size, "torch_threads": torch.get_num_threads(),
              "cpus": len(os.sched_getaffinity(0)), "machine": platform.processor() or platform.machine(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_start": _load()}

    if args.run:
        record["lora_export"] = lora_export
    (gguf, _), export = _timed(lambda: ev.base_gguf(model, tok), "gguf-base export")
    answers, t = _timed(lambda: llamacpp_answers(gguf, lora, ids, cfg.max_new_tokens, cfg.eval_batch_size),
                        "llama.cpp answers (cold)")
    record["llamacpp_cold"] = _gen_record(tok, rows, answers, t, {"export": export})
    ppl_l, record["retention_pytorch"] = _timed(lambda: retention_perplexity(model, tok, retention), "retention")

    with torch.no_grad():
        answers_pt, t = _timed(lambda: generate_answers(model, tok, rows, cfg.eval_batch_size, cfg.max_new_tokens),
                                   "PyTorch answers")
    record["pytorch"] = _gen_record(tok, rows, answers_pt, t)

    (gguf2, cached), export2 = _timed(lambda: ev.base_gguf(model, tok), "gguf-base (cached)")
    answers2, t = _timed(lambda: llamacpp_answers(gguf2, lora, ids, cfg.max_new_tokens, cfg.eval_batch_size),
                         "llama.cpp answers (warm)")
    record["llamacpp_warm"] = _gen_record(tok, rows, answers2, t, {"export": {**export2, "cached": cached}})
    record["retention_pytorch"]["ppl"] = ppl_l

    old = record["pytorch"]["wall_s"] + record["retention_pytorch"]["wall_s"]
    for name in ("llamacpp_cold", "llamacpp_warm"):
        r = record[name]
        new = r["export"]["wall_s"] + r["wall_s"] + record["retention_pytorch"]["wall_s"]
        r["end_to_end_s"] = round(new, 2)
        r["speedup_end_to_end"] = round(old / new, 2)
        r["speedup_generation_wall"] = round(record["pytorch"]["wall_s"] / r["wall_s"], 2)
        r["speedup_generation_cpu"] = round(record["pytorch"]["cpu_s"] / r["cpu_s"], 2)
        r["score_gap_vs_pytorch"] = round(r["score"] - record["pytorch"]["score"], 3)
        r["answers_equal_to_pytorch"] = sum(a == b for a, b in zip(answers if name == "llamacpp_cold" else answers2,
                                                                   answers_pt))
    record["pytorch"]["end_to_end_s"] = round(old, 2)
    record["load_end"] = _load()
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("pytorch", "llamacpp_cold", "llamacpp_warm")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
