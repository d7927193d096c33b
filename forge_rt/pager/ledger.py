"""The Pager's books: running totals of what the hooks saw, one record of deltas per step, and the bytes
each paged tensor holds in memory now (with the peak). Not locked itself: the Pager updates it under
its lock, from the hooks and from the spill writer's thread."""
from __future__ import annotations

COUNTERS = ("tensors", "bytes_saved", "bytes_kept", "bytes_raw", "bytes_compressed_raw", "bytes_compressed",
            "bytes_incompressible", "bytes_spilled", "bytes_read_back", "dedup_hits", "codec_s",
            "write_s", "read_s", "stall_s", "heap_trims")


def _ratio(s: dict) -> float:
    return s["bytes_compressed_raw"] / s["bytes_compressed"] if s["bytes_compressed"] else 1.0


class Ledger:
    def __init__(self):
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.steps: list[dict] = []
        self._step_start = dict(self.totals)
        self._held: dict[int, int] = {}  # record key -> bytes it holds in memory
        self.resident = 0
        self.peak_resident = 0

    def add(self, **amounts: float) -> None:
        for name, n in amounts.items():
            self.totals[name] += n

    # -- memory held by paged tensors --------------------------------------------------------
    def hold(self, key: int, n: int) -> None:
        self._held[key] = n
        self.resident += n
        self.peak_resident = max(self.peak_resident, self.resident)

    def let_go(self, key: int) -> int:
        """The record no longer holds memory (spilled, or freed by the graph); returns what it held."""
        n = self._held.pop(key, 0)
        self.resident -= n
        return n

    # -- reports -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        s = dict(self.totals)
        s["ratio"] = _ratio(s)
        s["resident_bytes"] = self.resident
        s["peak_resident_bytes"] = self.peak_resident
        return s

    def end_step(self, stats: dict) -> dict:
        """Closes the current step with `stats` (a Pager.stats()): its deltas since the previous step, and
        the peak held in memory during it. The next step's peak starts from what is held now."""
        rec = {k: stats[k] - self._step_start[k] for k in COUNTERS}
        rec["ratio"] = _ratio(rec)
        rec["peak_resident_bytes"] = self.peak_resident
        rec["step"] = len(self.steps)
        self._step_start = {k: stats[k] for k in COUNTERS}
        self.peak_resident = self.resident
        self.steps.append(rec)
        return rec
