"""Training data: loads a JSON/JSONL dataset in one of three forms, validates every row, and
tokenizes it with the model's chat template, with the loss on the response tokens only.

Accepted row forms (one per file, detected from the first row and reported as `Examples.format`):
    alpaca             {"instruction": str, "input": str (optional), "output": str}
    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                       the last message must be the assistant's: it is the one trained on
    prompt_completion  {"prompt": str, "completion": str}
Each is turned into chat `messages`; the last message is the response.

Length policy (tokenize_examples): an example longer than `max_len` keeps its prompt and loses the
tail of its response; it is counted in `n_truncated`. An example whose prompt alone fills `max_len`
(nothing of the response would be trained) is a DataError naming its line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forge_rt.errors import ForgeError

FORMATS = ("alpaca", "chat", "prompt_completion")
ROLES = ("system", "user", "assistant")
_FORM_HELP = ('use one of: {"instruction", "input", "output"} (alpaca), {"messages": [...]} (chat), '
              'or {"prompt", "completion"}')


class DataError(ForgeError, ValueError):
    """A dataset problem, found before training starts: where it is, what is wrong, how to fix it."""

    def __init__(self, path, line: int | None, field: str | None, problem: str, fix: str):
        self.path, self.line, self.field, self.problem, self.fix = str(path), line, field, problem, fix
        where = self.path + (f", line {line}" if line is not None else "")
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}. Fix: {fix}")


class Examples(list):
    """A list of {"messages": [...], "line": int} with the file's detected `format` and `path`."""

    def __init__(self, rows, format: str, path: Path):
        super().__init__(rows)
        self.format = format
        self.path = path


def demo_paths() -> dict[str, Path]:
    """The shipped demo task (see tools/make_demo_data.py)."""
    demo = Path(__file__).resolve().parent / "demo"
    return {"train": demo / "train.jsonl", "eval": demo / "eval.jsonl", "retention": demo / "retention.txt"}


_TABLE_FORMATS = {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet", ".pq": "Parquet", ".xlsx": "Excel",
                  ".xls": "Excel", ".arrow": "Arrow", ".feather": "Arrow"}


def read_text(path: Path, what: str, flag: str) -> str:
    """A UTF-8 text input (a leading byte-order mark is accepted), or a DataError saying why it cannot be read."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(path, None, None, f"{what} file not found", f"check the path passed to {flag}") from None
    except IsADirectoryError:
        raise DataError(path, None, None, "is a directory", f"pass a file to {flag}") from None
    except PermissionError:
        raise DataError(path, None, None, "permission denied", f"make it readable (chmod u+r {path})") from None
    except OSError as exc:
        raise DataError(path, None, None, f"cannot be read ({exc.strerror or exc})", "check the file") from None
    if raw.startswith(b"PAR1"):
        raise DataError(path, None, None, "a Parquet file; the supported formats are JSON and JSONL",
                        "convert it, e.g. pandas: df.to_json('data.jsonl', orient='records', lines=True)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"cannot be read as UTF-8 text (byte {exc.start})",
                        "save the file as UTF-8 JSON or JSONL") from None


def _read_rows(path: Path, text: str):
    """Yields (line_number, parsed_row) for a JSON array file or a JSONL file."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        # Decode the array item by item so each row keeps the line it starts on.
        dec = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            line = text.count("\n", 0, pos) + 1
            if pos >= len(text):
                raise DataError(path, line, None, "the JSON array is not closed", "end the file with ']'")
            if text[pos] == "]":
                if text[pos + 1:].strip():
                    raise DataError(path, line, None, "text after the closing ']'", "keep one JSON array per file")
                return
            try:
                row, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(path, line, None, f"invalid JSON in the row starting here ({exc.msg} at line "
                                f"{exc.lineno}, column {exc.colno})", "repair the JSON syntax") from None
            yield line, row
    else:
        for i, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                yield i, json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, i, None, f"invalid JSON ({exc.msg})",
                                "write one JSON object per line (JSONL), or one JSON array of objects") from None


def _detect(row) -> str | None:
    keys = set(row)
    found = [f for f, k in (("chat", "messages"), ("alpaca", "instruction"), ("prompt_completion", "prompt"))
             if k in keys]
    return found[0] if len(found) == 1 else None


def _need_str(path, line, row, key, *, optional=False, allow_empty=False) -> str:
    if key not in row:
        if optional:
            return ""
        raise DataError(path, line, key, "missing", f"add a non-empty string '{key}' to this row")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(path, line, key, f"expected a string, got {type(value).__name__}",
                        f"make '{key}' a JSON string")
    if not allow_empty and not value.strip():
        raise DataError(path, line, key, "empty", f"give '{key}' some text, or remove this row")
    return value


def _to_messages(path, line, row, form) -> list[dict]:
    if form == "alpaca":
        instruction = _need_str(path, line, row, "instruction")
        extra = _need_str(path, line, row, "input", optional=True, allow_empty=True)
        output = _need_str(path, line, row, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if form == "prompt_completion":
        return [{"role": "user", "content": _need_str(path, line, row, "prompt")},
                {"role": "assistant", "content": _need_str(path, line, row, "completion")}]
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "messages", "expected a non-empty list of {role, content} objects",
                        'write "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]')
    out = []
    for j, m in enumerate(messages):
        name = f"messages[{j}]"
        if not isinstance(m, dict):
            raise DataError(path, line, name, f"expected an object, got {type(m).__name__}",
                            'write {"role": ..., "content": ...}')
        if m.get("role") not in ROLES:
            raise DataError(path, line, f"{name}.role", f"expected one of {ROLES}, got {m.get('role')!r}",
                            "set the role to system, user or assistant")
        content = _need_str(path, line, m, "content", allow_empty=m["role"] == "system")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(path, line, f"messages[{len(out) - 1}].role", "the last message is not the assistant's",
                        "end each conversation with the assistant reply to train on")
    if not any(m["role"] == "user" for m in out):
        raise DataError(path, line, "messages", "no user message", "add the user turn that the reply answers")
    return out


def load_examples(path) -> Examples:
    """Reads and validates a whole dataset; raises DataError at the first bad row."""
    path = Path(path)
    if path.suffix.lower() in _TABLE_FORMATS:
        raise DataError(path, None, None, f"{_TABLE_FORMATS[path.suffix.lower()]} files are not supported; the "
                        "supported formats are JSON (an array of objects) and JSONL (one object per line)",
                        "convert it, e.g. pandas: df.to_json('data.jsonl', orient='records', lines=True)")
    text = read_text(path, "dataset", "--data / --eval-data")
    rows, form, form_line = [], None, None
    for line, row in _read_rows(path, text):
        if not isinstance(row, dict):
            raise DataError(path, line, None, f"expected a JSON object, got {type(row).__name__}", _FORM_HELP)
        this = _detect(row)
        if this is None:
            raise DataError(path, line, None, f"unknown row form (keys: {sorted(row)})", _FORM_HELP)
        if form is None:
            form, form_line = this, line
        elif this != form:
            raise DataError(path, line, None, f"mixed formats: this row is {this}, line {form_line} is {form}",
                            "convert the file to a single format")
        rows.append({"messages": _to_messages(path, line, row, this), "line": line})
    if not rows:
        raise DataError(path, None, None, "empty dataset (no rows)", "add at least one example")
    return Examples(rows, form, path)


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
                        "use an instruct/chat model, or set tokenizer.chat_template before training")
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
