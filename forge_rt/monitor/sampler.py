"""MemoryMap sampler: a background thread records memory ten times a second, with phase marks.

    mon = MemoryMonitor(out_path=run_dir, paging=pager)   # run_dir/memory.jsonl
    mon.start()
    mon.mark("forward", step); ...; mon.mark("backward", step); ...
    mon.stop()

or `with forge_rt.monitor.watch(run_dir): <any training loop>`, or `ForgeMemoryCallback` for a
transformers Trainer. The record is one JSON object per line, flushed as written, so a crashed or
running job can still be replayed (`python -m forge_rt.memmap RUN_DIR`, forge_rt.monitor.replay):

    {"type": "start", "time": <unix>, "interval": 0.1, "sources": {"cuda": "missing: ...", ...}, ...}
    {"type": "sample", "t": <s since start>, "rss": <bytes>, "mem_available": ..., "page_raw": ..., ...}
    {"type": "mark", "t": ..., "phase": "forward", "step": 3}
    {"type": "stop", "t": ..., "peaks": {...}}
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from forge_rt.monitor.sources import open_sources, unified_memory
from forge_rt.monitor.view import MemoryView

log = logging.getLogger("forge_rt.monitor")

PHASES = ("forward", "backward", "optimizer", "eval", "checkpoint", "idle")
RECORD_NAME = "memory.jsonl"

def record_path(path) -> Path:
    """A run directory -> its memory.jsonl; a path ending in .jsonl is used as given."""
    path = Path(path)
    return path if path.suffix == ".jsonl" else path / RECORD_NAME


class MemoryMonitor:
    """Samples every `interval` seconds in a daemon thread; writes `out_path` (run dir or .jsonl) if given.

    `paging`: any object with `.stats()` (a forge_rt Pager). `budget_bytes`: the memory the run may use
    (the panel shows headroom to it). `warn_available`: warn when system available memory falls under
    this many bytes (default: 10% of total). Missing sources are listed in `.sources`, never fatal.
    """

    def __init__(self, interval: float = 0.1, out_path=None, paging=None, budget_bytes: int | None = None,
                 warn_available: int | None = None, tegrastats: bool = True, history_s: float = 60.0):
        if not interval > 0:
            raise ValueError(f"MemoryMonitor: interval must be > 0 seconds, got {interval!r}")
        self.interval = interval
        self.out_path = record_path(out_path) if out_path is not None else None
        self.paging = paging
        self.budget_bytes = budget_bytes
        self.warn_available = warn_available
        self.tegrastats = tegrastats
        self.view = MemoryView(history_s)
        self.sources: dict[str, str] = {}
        self._sources: list = []
        self._file = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._state = "new"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "MemoryMonitor":
        if self._state != "new":
            raise RuntimeError(f"MemoryMonitor.start(): monitor is already {self._state}; make a new one")
        self._sources, self.sources = open_sources(self.paging, self.tegrastats)
        self._t0 = time.monotonic()
        first = self._sample()
        warn = self.warn_available
        if warn is None and "mem_total" in first:
            warn = first["mem_total"] // 10
        header = {"type": "start", "time": time.time(), "interval": self.interval, "pid": os.getpid(),
                  "sources": self.sources, "budget_bytes": self.budget_bytes, "warn_available": warn,
                  "unified_memory": unified_memory(),
                  "paging_budget": getattr(self.paging, "budget_bytes", None)}
        self.view.header = header
        if self.out_path is not None:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.out_path, "w", encoding="utf-8")
        missing = {k: v for k, v in self.sources.items() if v != "ok"}
        if missing:
            log.info("memory monitor: not sampled: %s", "; ".join(f"{k} ({v})" for k, v in missing.items()))
        self._state = "running"
        self._write(header)
        self._write(first)
        self.view.add_sample(first)
        self._thread = threading.Thread(target=self._loop, name="forge_rt-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._state != "running":
            return
        self._stop.set()
        self._thread.join()
        with self._lock:  # a mark() racing from another thread sees either all of this or none
            self._take()
            self._write({"type": "stop", "t": self._now(), "peaks": self.peaks(), "sources": self.sources})
            self._state = "stopped"
            for src in self._sources:
                src.close()
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "MemoryMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- marks and queries -----------------------------------------------------------------------
    def mark(self, phase: str, step: int | None = None) -> None:
        """Record that `phase` (forward, backward, optimizer, eval, checkpoint, idle, or your own) begins
        now, at training step `step`. A sample is taken first so the boundary belongs to the phase ending."""
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"MemoryMonitor.mark(): phase must be a non-empty string, got {phase!r}")
        if self._state == "new":
            raise RuntimeError("MemoryMonitor.mark() before start(): call start() (or use watch()) first")
        mark = {"type": "mark", "phase": phase, "step": None if step is None else int(step)}
        with self._lock:
            if self._state == "stopped":
                return
            self._take()
            mark["t"] = self._now()
            self._write(mark)
            self.view.add_mark(mark)

    def latest(self) -> dict | None:
        return self.view.latest()

    def peaks(self) -> dict[str, float]:
        return self.view.peaks()

    def missing(self) -> dict[str, str]:
        return {k: v for k, v in self.sources.items() if v != "ok"}

    # -- sampling --------------------------------------------------------------------------------
    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 4)

    def _sample(self) -> dict:
        sample = {"type": "sample", "t": self._now()}
        for src in list(self._sources):
            try:
                src.read(sample)
            except Exception as exc:  # a source that breaks mid-run is dropped, the run goes on
                self._sources.remove(src)
                self.sources[src.name] = f"failed: {type(exc).__name__}: {exc}"
                log.warning("memory monitor: source %s failed and is off from now on: %s", src.name, exc)
        return sample

    def _take(self) -> None:
        # Under the lock, so samples and marks from the two threads land in the file in time order.
        with self._lock:
            sample = self._sample()
            self._write(sample)
            self.view.add_sample(sample)

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()

    def _loop(self) -> None:
        due = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            self._take()
            due += self.interval
            now = time.monotonic()
            if due < now:  # fell behind (suspended, overloaded): skip the missed ticks, no burst
                due = now + self.interval


@contextlib.contextmanager
def watch(path=None, interval: float = 0.1, paging=None, show: bool = False, **kwargs):
    """Monitor whatever runs inside the block: `with watch(run_dir) as mon: train()`.
    `show=True` adds the live panel (plain lines when stdout is not a terminal)."""
    monitor = MemoryMonitor(interval=interval, out_path=path, paging=paging, **kwargs).start()
    try:
        if show:
            from forge_rt.monitor.ui.panel import live  # rich: only when the panel is asked for
            with live(monitor):
                yield monitor
        else:
            yield monitor
    finally:
        monitor.stop()
