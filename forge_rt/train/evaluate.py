"""Held-out evaluation: greedy batched generation scored against the reference answers, plus the
retention perplexity on a general-text sample (the catastrophic-forgetting guard).

Composite score, 0-100 = 100 * (0.5 * exact + 0.3 * field_acc + 0.2 * valid_json), where, for
references that are JSON objects (the demo task):
    valid_json  the answer holds a JSON object (the first '{...}' in it parses)
    exact       the verdict fields ("status" and "fault_code", or every key if the reference has
                neither) all match
    field_acc   the fraction of the reference's keys whose values match
Values match after trimming, collapsing whitespace, case-folding and dropping a trailing period.
If any reference is not a JSON object, the task is scored as text: exact = field_acc = the whole
answer matches, valid_json is None and score = 100 * exact.
"""
from __future__ import annotations

import json
import math
import time

import torch

from .data import prompt_text
from .distributed import SINGLE, Dist

WEIGHTS = {"exact": 0.5, "field_acc": 0.3, "valid_json": 0.2}
VERDICT_FIELDS = ("status", "fault_code")
N_SAMPLES = 5


def parse_json(text: str) -> dict | None:
    """The first JSON object in `text` (models often wrap it in prose or code fences), else None."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text, start)
            return obj if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def _norm(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return " ".join(text.split()).casefold().rstrip(".")


def score_predictions(predictions: list[str], references: list[str]) -> dict:
    """exact, field_acc, valid_json (fractions) and the composite score for parallel lists of texts."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if n == 0:
        raise ValueError("no references to score against")
    refs = [parse_json(r) for r in references]
    if any(r is None for r in refs):
        exact = sum(_norm(p) == _norm(r) for p, r in zip(predictions, references)) / n
        return {"score": 100 * exact, "exact": exact, "field_acc": exact, "valid_json": None, "n": n}
    exact = field_acc = valid = 0.0
    for pred_text, ref in zip(predictions, refs):
        pred = parse_json(pred_text)
        if pred is None:
            continue
        valid += 1
        match = {k: k in pred and _norm(pred[k]) == _norm(v) for k, v in ref.items()}
        verdict = [k for k in VERDICT_FIELDS if k in ref] or list(ref)
        exact += all(match[k] for k in verdict)
        field_acc += sum(match.values()) / len(match) if match else 1.0
    parts = {"exact": exact / n, "field_acc": field_acc / n, "valid_json": valid / n}
    return {"score": 100 * sum(WEIGHTS[k] * parts[k] for k in WEIGHTS), **parts, "n": n}


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
    if ids.numel() < 2:
        raise ValueError("retention text must have at least 2 tokens")
    nll, count, scored_to = 0.0, 0, 1  # token 0 has no context: never scored
    for w, begin in enumerate(range(0, ids.numel(), stride)):
        end = min(begin + window, ids.numel())
        new = max(scored_to - begin - 1, 0)  # targets already scored by the previous window
        scored_to = end
        if w % dist.world == dist.rank:
            logits = model(input_ids=ids[begin:end].unsqueeze(0), use_cache=False).logits[0, :-1].float()
            targets = ids[begin + 1:end]
            nll += torch.nn.functional.cross_entropy(logits[new:], targets[new:], reduction="sum").item()
            count += targets.numel() - new
        if end == ids.numel():
            break
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
    refs = [ex["messages"][-1]["content"] for ex in examples]
    result = score_predictions(answers, refs)
    result["ppl_retention"] = ppl
    result["samples"] = [{"prompt": ex["messages"][-2]["content"], "reference": ref, "prediction": ans}
                         for ex, ref, ans in list(zip(examples, refs, answers))[:N_SAMPLES]]
    result["seconds"] = time.perf_counter() - t0
    return result
