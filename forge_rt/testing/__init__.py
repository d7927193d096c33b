"""Helpers shared by tests/ and bench/ (as torch.testing is): tiny random models saved as HF directories
(with SmolLM2's tokenizer, so chat templates are real), small datasets, real-prose token batches, SmolLM2
cut to a few layers, LoRA and bitsandbytes-4-bit versions of a model, and a relative error."""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

# Every linear layer of a Llama-style decoder block.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Tiny configs of each architecture the streaming NF4 loader supports: name -> its own settings (the
# model_type is the name unless given). llama3: Llama 3.x rope scaling (rope_freqs in GGUF) and a tied head;
# gemma3_text: sliding-window layers with a window shorter than the test prompts, head_dim 256 as the real
# ones (llama.cpp and transformers' GGUF loader scale attention by its default); qwen3: q/k norms.
TINY_ARCHS = {"llama": {"tie_word_embeddings": False}, "mistral": {}, "qwen2": {}, "phi3": {},
              "gemma2": {"head_dim": 16}, "gemma3_text": {"head_dim": 256, "sliding_window": 8},
              "qwen3": {},  # head_dim 128 as every Qwen 3 (transformers reads no head_dim from a qwen3 GGUF)
              "llama3": {"model_type": "llama", "tie_word_embeddings": True, "rope_parameters": {
                  "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}}


def make_tiny_model_dir(path: Path, tokenizer, arch: str = "llama", max_shard_size: str | None = None,
                        **config) -> Path:
    """A random 2-layer causal LM of `arch` (a TINY_ARCHS key) saved with `tokenizer`, in shards of at most
    `max_shard_size` if given; `config`: settings over the arch's."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    settings = {**TINY_ARCHS[arch], **config}
    cfg = AutoConfig.for_model(settings.pop("model_type", arch), vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               **settings)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_rows(n: int = 24) -> list[dict]:
    codes = ["NORMAL", "INSPECT", "SHUTDOWN"]
    return [{"prompt": f"Reading {i}: temperature {40 + 7 * i} C. Verdict?",
             "completion": json.dumps({"status": codes[i % 3], "fault_code": "NONE", "reason": f"case {i}"})}
            for i in range(n)]


def tiny_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--output", str(out), "--no-live", "--no-eval",
            "--max-steps", "6", "--batch-size", "4", "--max-len", "64", "--lora-r", "4", "--warmup-steps", "1",
            "--checkpoint-every", "2", "--lr", "5e-3", *extra]


def sigint_at_optimizer_step(monkeypatch, n: int) -> None:
    """A real SIGINT delivered to this process during the n-th AdamW step from now (the step then completes);
    undo with monkeypatch.undo() or by setting torch.optim.AdamW.step back."""
    import os
    import signal
    calls, real_step = {"n": 0}, torch.optim.AdamW.step

    def step_then_signal(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def prose_ids(tokenizer, batch: int, tokens: int) -> torch.Tensor:
    """batch x tokens ids of real English prose (the standard library's docstrings), no padding; the
    text repeats if it is shorter than asked."""
    import argparse, collections, email, logging, os, pathlib, re, subprocess, tempfile, threading, unittest
    mods = (collections, email, json, logging, os, pathlib, re, subprocess, threading, inspect, unittest,
            argparse, tempfile)
    ids = tokenizer("\n\n".join(inspect.getdoc(m) or "" for m in mods), return_tensors="pt").input_ids[0]
    reps = -(-batch * tokens // ids.numel())
    return ids.repeat(reps)[: batch * tokens].view(batch, tokens)


def cut_layers(model, n_layers: int):
    """Keeps only the first n decoder layers of a HF causal LM, in place."""
    model.model.layers = model.model.layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    return model


def lora_model(model, r: int = 16, alpha: int = 32, targets=LLAMA_TARGETS, **kw):
    """The model wrapped in PEFT LoRA on `targets` (dropout 0 unless given)."""
    from peft import LoraConfig, get_peft_model
    kw.setdefault("lora_dropout", 0.0)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kw))


def dense_twin(model):
    """A deep copy of a quantize_model model with each NF4Linear replaced by a plain nn.Linear holding its
    weight dequantized by forge_rt.nf4.dequantize (not the fused kernels): stock PEFT over it is the oracle
    for the fused path, with no 4-bit base computation shared between the two."""
    import copy
    from forge_rt import nf4
    from forge_rt.nn import NF4Linear
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, NF4Linear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(nf4.dequantize(mod.nf4, torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin


def to_bnb4bit(model, skip: str = "lm_head"):
    """Every nn.Linear (but `skip`) replaced, in place, by a bitsandbytes Linear4bit (NF4, blocksize 64,
    double quantization) that bitsandbytes quantizes itself on the CPU."""
    import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and skip not in name:
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, blocksize=64)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new.to("cpu"))
    model.is_loaded_in_4bit = True  # how PEFT recognises a bitsandbytes 4-bit model
    return model


def peak_bytes(fn) -> int:
    """The most bytes torch held on the CPU at once while fn ran, counting only what fn allocated
    (torch.profiler memory events, summed in time order)."""
    import itertools
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0)


@contextlib.contextmanager
def cpu_path(name: str):
    """Runs the block on the extension's CPU path `name` (auto, generic, avx2), then restores the selection."""
    from forge_rt.core.native import require_native
    C = require_native()
    before = C.cpu_features()["selected"]
    C.testing.set_cpu_path(name)
    try:
        yield
    finally:
        C.testing.set_cpu_path(before)


def on_both_paths(fn):
    """fn() on the path the CPU gets (AVX2 where it has it) and on the forced generic one."""
    with cpu_path("auto"):
        fast = fn()
    with cpu_path("generic"):
        generic = fn()
    return fast, generic


def ggml_quantizer():
    """ggml's own C quantizer from the llama.cpp wheel (xllamacpp), through ctypes: the independent byte oracle
    of the K-quant writer. None when xllamacpp is not installed."""
    import ctypes
    import importlib.util
    import os
    spec = importlib.util.find_spec("xllamacpp")
    if spec is None:
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(spec.origin), "xllamacpp.abi3.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib
