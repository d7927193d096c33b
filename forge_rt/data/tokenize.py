"""Tokenizing examples with the model's chat template, with the loss on the response tokens only;
optional packing of several examples per row.

Length policy (tokenize_examples): an example longer than `max_len` keeps its prompt and loses the
tail of its response; it is counted in `n_truncated`. An example whose prompt alone fills `max_len`
(nothing of the response would be trained) is a DataError naming its line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from forge_rt.data.examples import DataError


@dataclass
class TokenizedData(torch.utils.data.Dataset):
    """Token ids and labels (-100 on the prompt) per row; `position_ids` only when packed.
    Use `DataLoader(data, collate_fn=data.collate)`."""
    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_token_id: int
    max_len: int
    n_examples: int
    n_truncated: int = 0
    truncated_lines: list[int] = field(default_factory=list)
    packed: bool = False
    position_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i) -> dict:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[i]
        return item

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def n_response_tokens(self) -> int:
        return sum(sum(t != -100 for t in lab) for lab in self.labels)

    def collate(self, batch: list[dict]) -> dict:
        return collate(batch, self.pad_token_id)


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pads a batch: labels -100 on pads. Unpacked rows get an attention_mask; packed rows get
    position_ids instead (restarting at 0 per example), from which transformers builds a per-example
    causal mask (it does so only when attention_mask is None and there is no KV cache: call the model
    with use_cache=False, as training does)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    packed = "position_ids" in batch[0]
    extra = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        if packed:
            # The padding tail forms its own block (positions from 0), so no real token sees it.
            extra[i, :n] = torch.tensor(b["position_ids"])
            extra[i, n:] = torch.arange(width - n)
        else:
            extra[i, :n] = 1
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The chat-template text that precedes the response (ends with the assistant header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(getattr(tokenizer, "name_or_path", "tokenizer"), None, None,
                        "the tokenizer has no chat template",
                        "train with --prompt-format model, alpaca or plain (data.formats sets one that needs no new "
                        "token), or set tokenizer.chat_template")
    return tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids). The response ends with the template's end-of-turn token; template
    text after it (e.g. a newline) is not trained on."""
    messages = example["messages"]
    prompt = prompt_text(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("(chat template)", example.get("line"), None,
                        "the tokenizer's chat template does not render the prompt as a prefix of the conversation",
                        "use a model whose chat template supports add_generation_prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in response_ids:
        response_ids = response_ids[:len(response_ids) - response_ids[::-1].index(eos)]
    elif eos is not None:
        response_ids = response_ids + [eos]
    return prompt_ids, response_ids


def _pack(seqs: list[tuple[list[int], list[int]]], max_len: int):
    """First-fit-decreasing bin packing of whole examples into rows of at most max_len tokens."""
    bins: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for ids, lab in sorted(seqs, key=lambda s: -len(s[0])):
        for b, free in enumerate(room):
            if len(ids) <= free:
                bins[b].append((ids, lab))
                room[b] -= len(ids)
                break
        else:
            bins.append([(ids, lab)])
            room.append(max_len - len(ids))
    ids = [[t for s in b for t in s[0]] for b in bins]
    labels = [[t for s in b for t in s[1]] for b in bins]
    positions = [[p for s in b for p in range(len(s[0]))] for b in bins]
    return ids, labels, positions


def tokenize_examples(examples, tokenizer, max_len: int, pack: bool = False) -> TokenizedData:
    """Chat-templates and tokenizes examples; labels are -100 on the prompt. See the module docstring
    for the length policy. With pack=True, whole examples share rows up to max_len tokens."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if not examples:
        raise DataError(getattr(examples, "path", "(examples)"), None, None, "no examples to tokenize",
                        "pass a non-empty dataset")
    path = getattr(examples, "path", "(examples)")
    seqs, truncated = [], []
    for ex in examples:
        prompt_ids, response_ids = _encode(tokenizer, ex)
        if len(prompt_ids) >= max_len:
            raise DataError(path, ex.get("line"), None,
                            f"the prompt alone is {len(prompt_ids)} tokens, so max_len={max_len} leaves no room "
                            "for the response", f"raise --max-len above {len(prompt_ids) + len(response_ids)} "
                            "or shorten this example")
        ids = (prompt_ids + response_ids)[:max_len]
        if len(prompt_ids) + len(response_ids) > max_len:
            truncated.append(ex.get("line"))
        seqs.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = dict(pad_token_id=pad, max_len=max_len, n_examples=len(seqs), n_truncated=len(truncated),
                  truncated_lines=truncated)
    if pack:
        ids, labels, positions = _pack(seqs, max_len)
        return TokenizedData(ids, labels, packed=True, position_ids=positions, **common)
    return TokenizedData([s[0] for s in seqs], [s[1] for s in seqs], **common)
