"""Training data: loads a JSON/JSONL dataset in one of three forms and validates every row (tokenizing is
data.tokenize's).

Accepted row forms (one per file, detected from the first row and reported as `Examples.format`):
    alpaca             {"instruction": str, "input": str (optional), "output": str}
    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                       the last message must be the assistant's: it is the one trained on
    prompt_completion  {"prompt": str, "completion": str}
Each is turned into chat `messages`; the last message is the response.
"""
from __future__ import annotations

import json
from pathlib import Path


from forge_rt.core.errors import ForgeError

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
