"""Find and replace secrets and personal data in training text, before tokenization.

    clean, findings = scrub_text("mail me at ana@example.org")   # -> "mail me at <EMAIL_1>"

Use one `Scrubber` for a whole run so the same value always maps to the same placeholder
(<EMAIL_1> stays <EMAIL_1> in every row). Placeholders are assigned through a keyed HMAC of the
value: the scrubber never stores a found value, and its report holds only counts.

`Scrubber(ner=True)` adds names of people, organisations and places (NAME, ORG, LOCATION) from an offline
spaCy model (`ner.py`, the `ner` extra), on the text the regular expressions left alone.
"""
from __future__ import annotations

import bisect
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Any

from forge_rt.core.errors import ForgeError

from . import ner as ner_layer
from .detectors import DETECTORS, TYPES

MODES = ("mask", "hash", "drop-row", "off")
NER_TYPES = ner_layer.TYPES
NER_STATUS = ("not active: names of people, organisations and places are not detected; "
              "enable with --scrub-ner (pip install 'forge_rt[ner]')")


class ScrubError(ForgeError, ValueError):
    pass


@dataclass(frozen=True)
class Finding:
    type: str
    start: int
    end: int

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


def find(text: str, types: tuple[str, ...] | None = None) -> list[Finding]:
    """All non-overlapping findings in `text`, sorted by position; specific detectors win overlaps."""
    lower = text.lower()
    found: list[Finding] = []
    for name, finder, triggers in DETECTORS:
        if (types is not None and name not in types) or (triggers and not any(t in lower for t in triggers)):
            continue
        _add_disjoint(found, ((name, start, end) for start, end in finder(text)))
    return found


def _add_disjoint(found: list[Finding], spans) -> None:
    """Adds the (type, start, end) spans that overlap nothing in `found` (sorted, disjoint), keeping it so:
    what is already there wins."""
    starts = [f.start for f in found]
    for name, start, end in spans:
        i = bisect.bisect_right(starts, start)
        if start >= end or (i and found[i - 1].end > start) or (i < len(starts) and starts[i] < end):
            continue
        starts.insert(i, start)
        found.insert(i, Finding(name, start, end))


def _normalize(kind: str, value: str) -> str:
    # So "4111 1111 1111 1111" and "4111-1111-1111-1111" get the same placeholder.
    if kind in ("PHONE", "CREDIT_CARD", "US_SSN"):
        return re.sub(r"\D", "", value)
    if kind in ("IBAN", "MAC", "IPV6"):
        return re.sub(r"[\s:.-]", "", value).upper()
    if kind == "EMAIL":
        return value.lower()
    if kind in NER_TYPES:   # "John  Miller" over a line break is still John Miller
        return " ".join(value.split())
    return value


@dataclass
class Scrubber:
    """Run-wide scrubber. `key` (bytes) keys the HMAC; None draws a random one, so hashes of two runs
    can't be linked and can't be reversed by hashing guesses without the key. `ner` adds the named-entity
    layer (MissingExtra here, before any text is read, when its extra is not installed)."""
    mode: str = "mask"
    key: bytes | None = None
    types: tuple[str, ...] | None = None
    ner: bool = False
    rows_seen: int = 0
    rows_touched: int = 0
    rows_dropped: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    _placeholders: dict[bytes, str] = field(default_factory=dict, repr=False)
    _per_type: dict[str, int] = field(default_factory=dict, repr=False)
    _ner: ner_layer.NerDetector | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ScrubError(f"scrub mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.types is not None:
            unknown = set(self.types) - set(TYPES + NER_TYPES)
            if unknown:
                raise ScrubError(f"unknown detector type(s) {sorted(unknown)}; known: {', '.join(TYPES + NER_TYPES)}")
        if self.ner and self.mode != "off":
            self._ner = ner_layer.NerDetector()
        if self.key is None:
            self.key = os.urandom(32)
        elif isinstance(self.key, str):
            self.key = self.key.encode()

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\0{_normalize(kind, value)}".encode(), hashlib.sha256).digest()

    def _replacement(self, kind: str, value: str) -> str:
        digest = self._digest(kind, value)
        if self.mode == "hash":
            return f"<{kind}#{digest.hex()[:12]}>"
        if digest not in self._placeholders:
            self._per_type[kind] = self._per_type.get(kind, 0) + 1
            self._placeholders[digest] = f"<{kind}_{self._per_type[kind]}>"
        return self._placeholders[digest]

    def scrub(self, text: str) -> tuple[str | None, list[Finding]]:
        """Scrub one text. Returns (clean_text, findings); clean_text is None when mode is "drop-row"
        and something was found. Findings' spans refer to the input text."""
        if self.mode == "off":
            return text, []
        findings = find(text, self.types)
        if self._ner is not None:   # regex findings first: NER only adds spans that overlap none of them
            _add_disjoint(findings, (s for s in self._ner.find(text) if self.types is None or s[0] in self.types))
        for f in findings:
            self.counts[f.type] = self.counts.get(f.type, 0) + 1
        if not findings:
            return text, findings
        if self.mode == "drop-row":
            return None, findings
        out, pos = [], 0
        for f in findings:
            out.append(text[pos:f.start])
            out.append(self._replacement(f.type, text[f.start:f.end]))
            pos = f.end
        out.append(text[pos:])
        return "".join(out), findings

    def scrub_row(self, row: Any) -> Any:
        """Scrub every string inside a row (str, or dict/list nesting such as {"messages": [...]}) and
        count it. Returns the cleaned row, or None if the row is dropped."""
        self.rows_seen += 1
        hits: list[Finding] = []

        def walk(x):
            if isinstance(x, str):
                clean, found = self.scrub(x)
                hits.extend(found)
                return clean
            if isinstance(x, dict):
                return {k: walk(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(walk(v) for v in x)
            return x

        clean = walk(row)
        if hits:
            self.rows_touched += 1
            if self.mode == "drop-row":
                self.rows_dropped += 1
                return None
        return clean

    def scrub_rows(self, rows) -> list:
        """Scrub an iterable of rows, leaving out dropped ones."""
        rows = list(rows)
        if self._ner is not None and self.mode != "off":   # one batched model pass over all of the rows' text
            self._ner.prefetch(s for row in rows for s in _strings(row))
        try:
            return [r for r in (self.scrub_row(row) for row in rows) if r is not None]
        finally:
            if self._ner is not None:
                self._ner.forget()

    def report(self) -> dict:
        """Counts only: never a found value, never the key."""
        return {
            "mode": self.mode,
            "rows_seen": self.rows_seen,
            "rows_touched": self.rows_touched,
            "rows_dropped": self.rows_dropped,
            "counts": dict(sorted(self.counts.items())),
            "total_findings": sum(self.counts.values()),
            "detectors": list(self.types or (TYPES + NER_TYPES if self._ner else TYPES)),
            "ner": self._ner.status if self._ner else NER_STATUS,
        }


def _strings(x):
    """Every string inside a row, in the order scrub_row visits them."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def scrub_text(text: str, mode: str = "mask", key: bytes | None = None) -> tuple[str | None, list[Finding]]:
    """One-shot scrub. Placeholders are consistent within this call only; use `Scrubber` for a run."""
    return Scrubber(mode=mode, key=key).scrub(text)


__all__ = ["Finding", "Scrubber", "ScrubError", "scrub_text", "find", "MODES", "TYPES", "NER_TYPES", "NER_STATUS"]
