"""The canary exposure audit ("secret sharer"): how far a model prefers each inserted secret over random
secrets of the same format, and whether greedy decoding completes the canary's prefix to it.

exposure = log2(#candidates) - log2(rank), where the candidates are the canary and n random secrets of its
format (so #candidates = n + 1) and rank 1 is the most likely. A model that learnt nothing of the secret
puts it at a uniformly random rank (about 1.4 bits on average); one that memorised it ranks it first
(log2(n + 1) bits, the most this estimate can show). Each sequence is scored as the trainer tokenizes it
(an `encode(messages) -> (ids, first_label_index)`; chat_encoder gives the trainer's own), summing the
log-likelihoods of the tokens after the context that all candidates share, in batches, without grad,
with the shared context run once per batch (KV cache)."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import torch
import torch.nn.functional as F

from forge_rt.privacy.canary import Canary, candidates
from forge_rt.privacy.errors import DPError

Encoder = Callable[[list[dict]], tuple[list[int], int]]


def chat_encoder(tokenizer, max_len: int = 4096) -> Encoder:
    """Rows tokenized exactly as the trainer does (chat template, loss on the response)."""
    from forge_rt.data.tokenize import tokenize_examples

    def encode(messages: list[dict]) -> tuple[list[int], int]:
        data = tokenize_examples([{"messages": messages, "line": None}], tokenizer, max_len)
        ids, labels = data.input_ids[0], data.labels[0]
        return ids, next(i for i, t in enumerate(labels) if t != -100)
    return encode


def _shared(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


@torch.no_grad()
def score(model, seqs: list[list[int]], start: int, batch_size: int = 64, pad_id: int = 0) -> torch.Tensor:
    """[len(seqs)] fp64: sum over t >= start of log p(seq[t] | seq[:t]), for sequences sharing their first
    `start` (>= 1) tokens; that context runs once per batch and its KV cache is repeated over the batch."""
    if start < 1 or any(s[:start] != seqs[0][:start] for s in seqs):
        raise DPError("score: the sequences must share a non-empty context of `start` tokens")
    dev = next(model.parameters()).device
    prefix = torch.tensor([seqs[0][:start]], device=dev)
    out = []
    for lo in range(0, len(seqs), batch_size):
        chunk = [s[start:] for s in seqs[lo:lo + batch_size]]
        b, width = len(chunk), max(len(s) for s in chunk)
        tails = torch.full((b, width), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((b, width), dtype=torch.long, device=dev)
        for i, s in enumerate(chunk):
            tails[i, :len(s)] = torch.tensor(s, device=dev)
            mask[i, :len(s)] = 1
        pre = model(input_ids=prefix, use_cache=True)
        # transformers >= 5.25 names the KV cache `cache` (output and argument); earlier, `past_key_values`
        key = "cache" if getattr(pre, "cache", None) is not None else "past_key_values"
        cache = getattr(pre, key)
        cache.batch_repeat_interleave(b)
        logits = model(input_ids=tails, attention_mask=torch.cat([mask.new_ones(b, start), mask], 1),
                       use_cache=True, **{key: cache}).logits
        # tail token j is predicted at the context's last position (j = 0) or at tail position j - 1
        pred = torch.cat([pre.logits[:, -1:].expand(b, 1, -1), logits[:, :-1]], 1).float()
        lp = F.log_softmax(pred, -1).gather(-1, tails[..., None]).squeeze(-1)
        out.append((lp.double() * mask).sum(1).cpu())
    return torch.cat(out)


def exposure_of(canary_score: float, candidate_scores: torch.Tensor) -> tuple[int, float]:
    """(rank, exposure) of the canary among itself and the random candidates (ties go to the canary)."""
    rank = 1 + int((candidate_scores > canary_score).sum())
    return rank, math.log2(candidate_scores.numel() + 1) - math.log2(rank)


@torch.no_grad()
def extracted(model, tokenizer, canary: Canary, ids: list[int], start: int) -> bool:
    """Whether greedy decoding from the shared context (the prompt and the format's prefix) writes the
    canary's text (followed by no further letter or digit)."""
    dev = next(model.parameters()).device
    ctx = torch.tensor([ids[:start]], device=dev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = model.generate(input_ids=ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=len(ids) - start + 2,
                         do_sample=False, pad_token_id=pad)
    text = tokenizer.decode(gen[0].tolist(), skip_special_tokens=True)
    return re.search(re.escape(canary.text) + r"(?![0-9A-Za-z])", text) is not None


def audit(model, tokenizer, canaries: list[Canary], encode: Encoder, n_candidates: int = 1000, seed: int = 0,
          batch_size: int = 64) -> list[dict]:
    """One record per canary: format, repeats, rank, exposure, candidates, extracted. The model is scored
    in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    secrets = {c.secret for c in canaries}
    rows = []
    try:
        for c in canaries:
            pool = [c.secret] + candidates(c, n_candidates, seed, exclude=secrets)
            seqs = [encode(dataclasses.replace(c, secret=s).messages())[0] for s in pool]
            start = _shared(seqs)
            scores = score(model, seqs, start, batch_size, pad)
            rank, exp = exposure_of(float(scores[0]), scores[1:])
            rows.append({"format": c.format, "repeats": c.repeats, "scrubbable": c.fmt.scrubbable, "rank": rank,
                         "candidates": n_candidates + 1, "exposure": exp,
                         "extracted": extracted(model, tokenizer, c, seqs[0], start)})
    finally:
        model.train(was_training)
    return rows


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per (format, repeats): the mean exposure and the number extracted under each model (e.g. {"base":
    rows, "tuned": rows}), in the order the canaries came."""
    cells: dict[tuple, dict] = {}
    for model_name, rows in results.items():
        for r in rows:
            cell = cells.setdefault((r["format"], r["repeats"]), {
                "format": r["format"], "repeats": r["repeats"], "scrubbable": r["scrubbable"],
                "max_exposure": math.log2(r["candidates"])})
            cell.setdefault(f"{model_name}_exposures", []).append(r["exposure"])
            cell[f"{model_name}_extracted"] = cell.get(f"{model_name}_extracted", 0) + int(r["extracted"])
    for cell in cells.values():
        for name in results:
            values = cell.pop(f"{name}_exposures", [])
            cell[f"{name}_exposure"] = sum(values) / len(values) if values else None
    return list(cells.values())


def markdown(summary: list[dict], models: list[str]) -> str:
    """The summary as a Markdown table: exposure (bits) and extractions per model."""
    head = "| format | scrubber finds it | repeats | " + " | ".join(
        f"{m} exposure (bits) | {m} extracted" for m in models) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(models))]
    for c in summary:
        vals = " | ".join(f"{c[f'{m}_exposure']:.2f} | {c[f'{m}_extracted']}" for m in models)
        lines.append(f"| {c['format']} | {'yes' if c['scrubbable'] else 'no'} | {c['repeats']} | {vals} |")
    return "\n".join(lines)
