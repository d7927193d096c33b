"""Greedy generation, tokens per second: forge_rt (SmolLM2-135M, NF4 + LoRA, fused kernels, HF generate) against
the same model merged and exported with forge_rt.export to a Q4_0 GGUF, run in llama.cpp (xllamacpp). The
adapter is freshly initialised (B = 0), so both answer alike; the figure is speed, not quality."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from forge_rt.bench.cases import Skip, have
from forge_rt.bench.record import row

ESTIMATE_S = {"tiny": 60, "quick": 90, "full": 120}
PROMPT = "Explain in a few sentences why a pump's bearing temperature rises before it fails."


def _forge_tokens_per_s(model, tok, new_tokens: int, device: str) -> float:
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t0
    return (out.shape[1] - ids["input_ids"].shape[1]) / dt


def _llamacpp_tokens_per_s(gguf: Path, new_tokens: int) -> float:
    from forge_rt.eval.llamacpp import LlamaCppEngine
    server = LlamaCppEngine(gguf).server
    req = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": new_tokens, "temperature": 0.0,
           "top_k": 1, "ignore_eos": True}
    server.handle_chat_completions(req)  # warm-up
    t0 = time.perf_counter()
    res = server.handle_chat_completions(req)
    dt = time.perf_counter() - t0
    return res["usage"]["completion_tokens"] / dt


def run(ctx) -> list[dict]:
    if not have("xllamacpp"):
        raise Skip("xllamacpp (llama.cpp, the baseline) is not installed")
    import forge_rt
    from forge_rt.export.gguf_model import write_gguf
    from forge_rt.export.merge import merge
    from forge_rt.testing import lora_model
    from forge_rt.models import default_gguf_path, load_model
    new_tokens = ctx.pick(8, 32, 64)
    model, tok = load_model(dtype=torch.float32)
    pm = lora_model(forge_rt.quantize_model(model).to(ctx.torch_device))
    forge_rt.accelerate(pm)
    ours = _forge_tokens_per_s(pm, tok, new_tokens, ctx.torch_device)
    with tempfile.TemporaryDirectory(prefix="forge_rt-bench-gguf-") as tmp:
        gguf = Path(tmp) / "model.gguf"
        write_gguf(merge(pm.to("cpu")), tok, gguf, "q4_0", default_gguf_path())
        theirs = _llamacpp_tokens_per_s(gguf, new_tokens)
    return [row("generate", f"SmolLM2-135M greedy, {new_tokens} new tokens", ours, "tokens/s", better="higher",
                baseline="llama.cpp Q4_0 GGUF", baseline_value=theirs)]
