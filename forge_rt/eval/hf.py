"""Held-out evaluation in PyTorch: greedy batched generation scored against the reference answers
(eval.score), plus the retention perplexity on a general-text sample (the catastrophic-forgetting guard).
Under torchrun each rank takes its share of batches and windows (core.dist)."""
from __future__ import annotations

import math
import time

import torch

from forge_rt.core.dist import SINGLE, Dist
from forge_rt.data import prompt_text
from forge_rt.eval.score import perplexity_windows, score_examples


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_answers(model, tokenizer, examples, batch_size: int = 16, max_new_tokens: int = 64,
                     dist: Dist = SINGLE) -> list[str | None]:
    """Greedy answers to each example's prompt (all messages but the last), batched with left padding.
    Under torchrun a rank answers every world-th batch (None for the others' examples): the batches, and
    so the padding and the answers, are those of one process."""
    prompts = [prompt_text(tokenizer, ex["messages"]) for ex in examples]
    # Similar lengths per batch means less padding; answers are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id  # model_load sets one; batched left padding needs it anyway
    answers = [""] * len(prompts) if not dist.enabled else [None] * len(prompts)
    for b, s in enumerate(range(0, len(order), batch_size)):
        if b % dist.world != dist.rank:
            continue
        idx = order[s:s + batch_size]
        enc = tokenizer([prompts[i] for i in idx], padding=True, padding_side="left",
                        add_special_tokens=False, return_tensors="pt").to(_device(model))
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             use_cache=True)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            answers[i] = t.strip()
    return answers


@torch.no_grad()
def retention_perplexity(model, tokenizer, text: str, window: int = 512, stride: int = 256,
                         dist: Dist = SINGLE) -> float:
    """Perplexity of `text`, by sliding windows: each token is scored once, with up to `window - stride`
    tokens of context carried over from the previous window. Under torchrun each rank scores every
    world-th window and the sums are gathered."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0].to(_device(model))
    nll, count = 0.0, 0
    for w, (begin, end, new) in enumerate(perplexity_windows(ids.numel(), window, stride)):
        if w % dist.world == dist.rank:
            logits = model(input_ids=ids[begin:end].unsqueeze(0), use_cache=False).logits[0, :-1].float()
            targets = ids[begin + 1:end]
            nll += torch.nn.functional.cross_entropy(logits[new:], targets[new:], reduction="sum").item()
            count += targets.numel() - new
    sums = dist.gather([(nll, count)], "the retention perplexity")
    return math.exp(sum(n for n, _ in sums) / sum(c for _, c in sums))


def evaluate(model, tokenizer, examples, retention_text: str, batch_size: int = 16,
             max_new_tokens: int = 64, dist: Dist = SINGLE) -> dict:
    """Scores `model` (plain or PEFT) on held-out examples and retention text. Returns score, exact,
    field_acc, valid_json, ppl_retention, n, samples (first few prompt/reference/prediction) and
    seconds. Under torchrun the work is shared out and gathered: every rank gets the same result."""
    if not examples:
        raise ValueError("no evaluation examples")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        answers = generate_answers(model, tokenizer, examples, batch_size, max_new_tokens, dist)
        for i, a in dist.gather([(i, a) for i, a in enumerate(answers) if a is not None], "evaluation"):
            answers[i] = a
        ppl = retention_perplexity(model, tokenizer, retention_text, dist=dist)
    finally:
        model.train(was_training)
    result = score_examples(examples, answers)
    result.update(ppl_retention=ppl, seconds=time.perf_counter() - t0, engine="pytorch")
    return result
