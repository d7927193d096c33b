"""Scoring held-out answers against their references (the same for every engine: PyTorch, llama.cpp).

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


def score_examples(examples, answers: list[str]) -> dict:
    """score_predictions of `answers` against each example's last message, with the first few as samples."""
    refs = [ex["messages"][-1]["content"] for ex in examples]
    result = score_predictions(answers, refs)
    result["samples"] = [{"prompt": ex["messages"][-2]["content"], "reference": ref, "prediction": ans}
                         for ex, ref, ans in list(zip(examples, refs, answers))[:N_SAMPLES]]
    return result


def perplexity_windows(n: int, window: int = 512, stride: int = 256):
    """The sliding windows of a perplexity over n tokens, as (begin, end, first): the window is tokens
    [begin, end) and its targets begin+1 .. end-1 from index `first` of them on are scored (the earlier ones
    were scored by the previous window). Each token but the first is scored once, with up to window - stride
    tokens of context carried over. The same windows for every engine (PyTorch, llama.cpp)."""
    if n < 2:
        raise ValueError("retention text must have at least 2 tokens")
    scored_to = 1  # token 0 has no context: never scored
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        yield begin, end, max(scored_to - begin - 1, 0)
        scored_to = end
        if end == n:
            return

