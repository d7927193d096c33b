"""The held-out evaluation in llama.cpp: the same prompts, greedy answers and scoring as eval.hf, decoded by
llama.cpp on the GGUF files a user deploys (the base as trained + the run's adapter), many sequences at once.

Why llama.cpp: what it scores is what the user runs, and its server's parallel slots batch the decode of many
sequences (continuous batching: a finished sequence's slot takes the next prompt at once, with no padding). One
sequence at a time it decodes ~6x faster than HF generate; 32 at once the two are about even here (measured alone,
32 base-model answers of 64 tokens: llama.cpp 93 tokens/s, PyTorch 88, the same answers; bench/results/eval_speed.json). Prompts are rendered and tokenized here exactly as for PyTorch (data.prompt_text with the
run's tokenizer) and handed over as token ids, so both engines see the same tokens. Retention perplexity needs
the model's logits over a text, which the server does not return: it stays in PyTorch (eval.hf)."""
from __future__ import annotations

import time

from forge_rt.data import prompt_text
from forge_rt.eval.hf import retention_perplexity
from forge_rt.eval.llamacpp import LlamaCppEngine
from forge_rt.eval.score import score_examples

CTX_ROUND = 64  # slot contexts are rounded up to this many tokens


def prompt_ids(tokenizer, examples) -> list[list[int]]:
    """Each example's prompt (all messages but the last, with the generation header) as token ids."""
    texts = [prompt_text(tokenizer, ex["messages"]) for ex in examples]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def llamacpp_answers(gguf, lora, prompts: list[list[int]], max_new_tokens: int, parallel: int,
                     threads: int | None = None) -> list[str]:
    """Greedy answers from llama.cpp, `parallel` sequences decoded side by side."""
    need = max(len(p) for p in prompts) + max_new_tokens + 1
    n_ctx = -(-need // CTX_ROUND) * CTX_ROUND
    engine = LlamaCppEngine(gguf, lora, n_ctx=n_ctx, threads=threads, n_parallel=max(1, min(parallel, len(prompts))))
    try:
        return engine.complete(prompts, max_new_tokens)
    finally:
        del engine.server  # the model and its caches go now, not when the engine is collected


def evaluate_llamacpp(model, tokenizer, examples, retention_text: str | None, gguf, lora=None, *,
                      max_new_tokens: int = 64, parallel: int = 32, threads: int | None = None) -> dict:
    """eval.hf.evaluate's result, with the answers from llama.cpp on `gguf` (+ `lora`) and the retention
    perplexity from `model` in PyTorch (skipped when `retention_text` is None)."""
    if not examples:
        raise ValueError("no evaluation examples")
    t0 = time.perf_counter()
    answers = llamacpp_answers(gguf, lora, prompt_ids(tokenizer, examples), max_new_tokens, parallel, threads)
    t_gen = time.perf_counter() - t0
    result = score_examples(examples, answers)
    if retention_text is not None:
        was_training = model.training
        model.eval()
        try:
            result["ppl_retention"] = retention_perplexity(model, tokenizer, retention_text)
        finally:
            model.train(was_training)
    result.update(seconds=time.perf_counter() - t0, generation_seconds=t_gen, engine="llama.cpp",
                  gguf=str(gguf), lora=None if lora is None else str(lora), parallel=parallel)
    return result
