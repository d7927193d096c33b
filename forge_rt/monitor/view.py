"""The running state of a memory record (`MemoryView`: latest sample, running peaks, the last minute,
the current phase) and byte formatting. No rich here: the panels that draw it are in monitor.ui.

The same view is fed by a running `MemoryMonitor` or by a `memory.jsonl` being followed from another
terminal (`python -m forge_rt.memmap --watch`), so both show the identical panel.
"""
from __future__ import annotations

import collections
import threading

from forge_rt.monitor.sources import POOLS


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


class MemoryView:
    """Latest sample, running peaks, the last `history_s` seconds, and the current phase of one record."""

    def __init__(self, history_s: float = 60.0):
        self.history_s = history_s
        self.header: dict = {}
        self._recent: collections.deque = collections.deque()
        self._peaks: dict[str, float] = {}
        self._lock = threading.Lock()
        self.phase: str | None = None
        self.step: int | None = None
        self.n_samples = 0

    def add_sample(self, sample: dict) -> None:
        with self._lock:
            self._recent.append(sample)
            while self._recent and sample["t"] - self._recent[0]["t"] > self.history_s:
                self._recent.popleft()
            for key in POOLS:
                if key in sample and sample[key] > self._peaks.get(key, float("-inf")):
                    self._peaks[key] = sample[key]
            self.n_samples += 1

    def add_mark(self, mark: dict) -> None:
        self.phase, self.step = mark["phase"], mark.get("step")

    def latest(self) -> dict | None:
        with self._lock:
            return dict(self._recent[-1]) if self._recent else None

    def peaks(self) -> dict[str, float]:
        with self._lock:
            return dict(self._peaks)

    def history(self, key: str) -> list[float]:
        with self._lock:
            return [s[key] for s in self._recent if key in s]

    def warn_low(self, sample: dict | None) -> bool:
        limit = self.header.get("warn_available")
        return bool(sample and limit and sample.get("mem_available", limit) < limit)

    def headroom(self, sample: dict) -> tuple[str, float | None]:
        """(label, bytes): to the configured budget when there is one, else what the system still has."""
        budget = self.header.get("budget_bytes")
        if budget:
            used = sample.get("rss", 0) + (0 if self.header.get("unified_memory") else sample.get("cuda_reserved", 0))
            return f"headroom to budget {fmt_bytes(budget)}", budget - used
        return "system available", sample.get("mem_available")
