"""Reading a MemoryMap record back: `load` a finished memory.jsonl, `RecordFollower` a growing one (for
`python -m forge_rt.memmap --watch`), `summary` the peak of each pool with the phase that ran then.
Corrupt or truncated lines are skipped with a warning. Needs no optional extra: the table and the
picture are drawn by monitor.ui (rich, matplotlib).
"""
from __future__ import annotations

import bisect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from forge_rt.core.errors import ForgeError
from forge_rt.monitor.sampler import record_path
from forge_rt.monitor.sources import POOLS
from forge_rt.monitor.view import MemoryView

_KINDS = ("start", "sample", "mark", "stop")


class NoRecordError(ForgeError, FileNotFoundError):
    """There is no memory.jsonl where one was asked for."""


class RecordWarning(UserWarning):
    """A line of memory.jsonl could not be used."""


@dataclass
class Record:
    path: Path
    header: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    marks: list[dict] = field(default_factory=list)
    stop: dict | None = None

    def add(self, rec: dict) -> None:
        kind = rec["type"]
        if kind == "sample":
            self.samples.append(rec)
        elif kind == "mark":
            self.marks.append(rec)
        elif kind == "start":
            self.header = rec
        else:
            self.stop = rec

    def phase_at(self, t: float) -> tuple[str | None, int | None]:
        """The phase (and step) marked last at or before time t."""
        i = bisect.bisect_right([m["t"] for m in self.marks], t) - 1
        return (self.marks[i]["phase"], self.marks[i].get("step")) if i >= 0 else (None, None)

    def phase_spans(self) -> list[tuple[float, float, str, int | None]]:
        """(start, end, phase, step) of each marked phase; a phase lasts until the next mark."""
        end = self.samples[-1]["t"] if self.samples else 0.0
        if self.stop is not None:
            end = max(end, self.stop["t"])
        bounds = [m["t"] for m in self.marks[1:]] + [end]
        return [(m["t"], max(m["t"], b), m["phase"], m.get("step")) for m, b in zip(self.marks, bounds)]


def parse_line(text: str) -> dict:
    """One line -> record dict; ValueError saying what is wrong with it."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg}); truncated or corrupt") from None
    if not isinstance(rec, dict) or rec.get("type") not in _KINDS:
        raise ValueError(f"not a record: 'type' must be one of {', '.join(_KINDS)}")
    if rec["type"] != "start" and not isinstance(rec.get("t"), (int, float)):
        raise ValueError("no numeric 't' (seconds since start)")
    if rec["type"] == "mark" and not isinstance(rec.get("phase"), str):
        raise ValueError("mark without a 'phase' string")
    return rec


def _skip(path: Path, lineno: int, why: str) -> None:
    warnings.warn(f"{path}: line {lineno} skipped: {why}", RecordWarning, stacklevel=3)


def load(path) -> Record:
    """Read a run dir's memory.jsonl (or a .jsonl path). Bad lines are skipped with a RecordWarning."""
    path = record_path(path)
    if not path.is_file():
        raise NoRecordError(f"{path}: no memory record here; run training with the memory monitor on "
                                f"(forge_rt.train does by default, or wrap a loop in forge_rt.monitor.watch(dir))")
    record = Record(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record.add(parse_line(line))
            except ValueError as exc:
                _skip(path, lineno, str(exc))
    return record


class RecordFollower:
    """Reads a growing memory.jsonl: `poll()` takes the complete lines written since the last call and
    feeds `.view` (for the live panel) and `.record` (for the final picture)."""

    def __init__(self, path, history_s: float = 60.0):
        self.path = record_path(path)
        self.record = Record(self.path)
        self.view = MemoryView(history_s)
        self._offset = 0
        self._lineno = 0
        self._partial = b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")  # the last piece may be half-written
        for raw in lines:
            self._lineno += 1
            if not raw.strip():
                continue
            try:
                rec = parse_line(raw.decode("utf-8", errors="replace"))
            except ValueError as exc:
                _skip(self.path, self._lineno, str(exc))
                continue
            self.record.add(rec)
            if rec["type"] == "start":
                self.view.header = rec
            elif rec["type"] == "sample":
                self.view.add_sample(rec)
            elif rec["type"] == "mark":
                self.view.add_mark(rec)
        return len(lines)

    @property
    def finished(self) -> bool:
        return self.record.stop is not None


def summary(record: Record) -> list[dict]:
    """Per pool: peak bytes, when, and the phase/step running then. Plus the kernel's own high-water
    mark of process RSS (VmHWM), which also catches peaks between two samples."""
    rows = []
    for key in [*POOLS, "rss_peak"]:
        best = None
        for s in record.samples:
            if key in s and (best is None or s[key] > best[key]):
                best = s
        if best is None:
            continue
        phase, step = record.phase_at(best["t"])
        rows.append({"pool": key, "label": POOLS.get(key, "process peak RSS (VmHWM)"), "peak": best[key],
                     "t": best["t"], "phase": phase, "step": step})
    return rows
