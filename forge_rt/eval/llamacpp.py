"""Running an exported GGUF where it will be deployed: llama.cpp, through the `xllamacpp` wheel (embeds
llama.cpp, CPU; `pip install forge_rt[export]`). Prompts go through llama.cpp's own chat handling with
the GGUF's chat template, greedy, as a deployed llama-server would answer them."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from forge_rt.core.errors import ForgeError

from forge_rt.eval.score import perplexity_windows, score_examples


class LlamaCppError(ForgeError, RuntimeError):
    pass


def _xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        raise LlamaCppError("llama.cpp scoring needs xllamacpp: pip install 'forge_rt[export]' "
                            "(or pip install xllamacpp)") from None
    return xllamacpp


class LlamaCppEngine:
    """A GGUF model (+ optional GGUF LoRA adapter) loaded in llama.cpp, answering greedily."""

    def __init__(self, gguf, lora=None, n_ctx: int = 2048, threads: int | None = None, n_parallel: int = 1):
        """`n_parallel` slots decode that many sequences at once (continuous batching), each with a context
        of `n_ctx` tokens."""
        xlc = _xllamacpp()
        for path in (gguf, lora):
            if path is not None and not Path(path).is_file():
                raise LlamaCppError(f"{path} does not exist")
        params = xlc.CommonParams()
        params.model.path = str(gguf)
        params.n_parallel = n_parallel
        params.n_ctx = n_ctx * n_parallel  # llama.cpp splits the context evenly between the slots
        params.warmup = False
        params.verbosity = -1
        params.sampling.temp = 0.0
        params.sampling.top_k = 1
        for cpu in (params.cpuparams, params.cpuparams_batch):
            cpu.n_threads = threads or len(os.sched_getaffinity(0))
            cpu.poll = 0  # sleep, not spin, between ops: spinning threads stall on a shared, busy machine
        if lora is not None:
            params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(lora), 1.0)]
        try:
            self.server = xlc.Server(params)
        except RuntimeError as exc:
            raise LlamaCppError(f"llama.cpp could not load {gguf}" + (f" with adapter {lora}" if lora else "")
                                + f": {exc}") from None

    def chat(self, messages: list[dict], max_tokens: int = 64) -> str:
        """The greedy reply to a conversation (rendered with the GGUF's chat template)."""
        res = self.server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens,
                                                   "temperature": 0.0, "top_k": 1})
        if "error" in res:
            raise LlamaCppError(f"llama.cpp: {res['error']}")
        return (res["choices"][0]["message"]["content"] or "").strip()

    def answers(self, conversations: list[list[dict]], max_tokens: int = 64) -> list[str]:
        return [self.chat(messages, max_tokens) for messages in conversations]

    def complete(self, prompts: list[list[int]], max_tokens: int = 64) -> list[str]:
        """Greedy continuations of prompts given as token ids, all queued at once: the server's slots decode
        them side by side. Token ids (not text) so the prompt is exactly the one PyTorch sees. `cache_prompt`: a
        slot keeps the KV of its last prompt's common prefix (the demo's 200 prompts share their first 62 of ~109
        tokens: system prompt and instruction): 123 -> 87 s for the tuned 135M model in one-off paired runs, alone."""
        res = self.server.handle_completions({"prompt": prompts, "n_predict": max_tokens, "temperature": 0.0,
                                              "top_k": 1, "cache_prompt": True})
        if "error" in res:
            raise LlamaCppError(f"llama.cpp: {res['error']}")
        choices = sorted(res["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise LlamaCppError(f"llama.cpp answered {len(choices)} of {len(prompts)} prompts")
        return [c["text"].strip() for c in choices]

    def token_logprobs(self, ids: list[int], first: int = 1) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = first .. len(ids) - 1, teacher-forced. The server scores no prompt
        tokens, so each step asks for one token with ids[i] forced by a logit bias; the log-prob it reports for
        the chosen token comes from the raw logits, before any sampler (equal to PyTorch's log-softmax on a tiny
        f32 model: tests/eval/test_engine.py). The slot keeps the prefix's KV: one new token a step."""
        out = []
        for i in range(max(first, 1), len(ids)):
            res = self.server.handle_completions({"prompt": ids[:i], "n_predict": 1, "n_probs": 1, "cache_prompt": True,
                                                  "logit_bias": [[ids[i], 1e4]], "samplers": ["logit_bias", "top_k"],
                                                  "top_k": 1, "temperature": 0.0})
            if "error" in res:
                raise LlamaCppError(f"llama.cpp: {res['error']}")
            step = res["choices"][0]["logprobs"]["content"][0]
            if step["id"] != ids[i]:
                raise LlamaCppError(f"llama.cpp did not take the forced token {ids[i]} (got {step['id']})")
            out.append(step["logprob"])
        return out

    def perplexity(self, ids: list[int], window: int = 512, stride: int = 256) -> float:
        """Perplexity of a token sequence over the same sliding windows as forge_rt.eval.hf.retention_perplexity."""
        nll, count = 0.0, 0
        for begin, end, new in perplexity_windows(len(ids), window, stride):
            logprobs = self.token_logprobs(ids[begin:end], first=1 + new)
            nll -= sum(logprobs)
            count += len(logprobs)
        return math.exp(nll / count)


def evaluate_gguf(gguf, lora=None, eval_rows=None, max_new_tokens: int = 64, threads: int | None = None) -> dict:
    """The held-out composite score (forge_rt.evaluate's scoring) of a GGUF (+ LoRA GGUF) in llama.cpp.
    `eval_rows`: examples as forge_rt.data.load_examples gives them (default: the demo's held-out set).
    Retention perplexity is not measured here (it needs the model's logits)."""
    from forge_rt.data import demo_paths, load_examples
    rows = eval_rows if eval_rows is not None else load_examples(demo_paths()["eval"])
    if not rows:
        raise ValueError("no evaluation examples")
    engine = LlamaCppEngine(gguf, lora, threads=threads)
    t0 = time.perf_counter()
    answers = engine.answers([ex["messages"][:-1] for ex in rows], max_new_tokens)
    result = score_examples(rows, answers)
    result.update(seconds=time.perf_counter() - t0, engine="llama.cpp (xllamacpp)", gguf=str(gguf), lora=None if lora is None else str(lora))
    return result
