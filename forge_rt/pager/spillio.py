"""The spill file's two threads: a writer that appends queued blobs in order, and a reader that brings
blobs back ahead of backward into a small cache."""
from __future__ import annotations

import queue
import threading
import time

import torch

from forge_rt.pager.codec import PagingError
from forge_rt.pager.spill import Extent, SpillFile


class Writer(threading.Thread):
    """Writes queued jobs in order; `on_done(job, extent | None, error | None)` runs on this thread."""

    def __init__(self, spill: SpillFile, on_done):
        super().__init__(name="forge_rt-spill-writer", daemon=True)
        self.spill, self.on_done = spill, on_done
        self.jobs: queue.Queue = queue.Queue()
        self.seconds = 0.0

    def submit(self, job, data_fn, checksum: bool = True) -> None:
        self.jobs.put((job, data_fn, checksum))

    def run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job, data_fn, checksum = item
            t0 = time.perf_counter()
            try:
                extent, error = self.spill.write(data_fn(), checksum), None
            except PagingError as exc:
                extent, error = None, exc
            self.seconds += time.perf_counter() - t0
            self.on_done(job, extent, error)
            del item, job, data_fn  # holding the last record here would keep its graph's blob alive

    def stop(self) -> None:
        self.jobs.put(None)
        self.join()


class Reader(threading.Thread):
    """Reads extents ahead of backward into a small cache; `fetch` waits for or reads one itself."""

    def __init__(self, spill: SpillFile):
        super().__init__(name="forge_rt-spill-reader", daemon=True)
        self.spill = spill
        self._cv = threading.Condition()
        self._wanted: list[tuple[int, Extent, str]] = []
        self._cache: dict[int, torch.Tensor | Exception] = {}
        self._busy: int | None = None
        self._stopping = False
        self.seconds = 0.0

    def want(self, items: list[tuple[int, Extent, str]]) -> None:
        with self._cv:
            self._wanted = [it for it in items if it[0] not in self._cache and it[0] != self._busy]
            self._cv.notify_all()

    def forget(self, key: int) -> None:
        with self._cv:
            self._cache.pop(key, None)

    def fetch(self, key: int, extent: Extent, name: str) -> torch.Tensor:
        with self._cv:
            self._wanted = [it for it in self._wanted if it[0] != key]
            while self._busy == key:
                self._cv.wait()
            got = self._cache.pop(key, None)
        if got is None:
            t0 = time.perf_counter()
            got = self.spill.read(extent, name)
            self.seconds += time.perf_counter() - t0
        if isinstance(got, Exception):
            raise got
        return got

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._wanted and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                key, extent, name = self._wanted.pop(0)
                self._busy = key
            t0 = time.perf_counter()
            try:
                got: torch.Tensor | Exception = self.spill.read(extent, name)
            except PagingError as exc:
                got = exc
            self.seconds += time.perf_counter() - t0
            with self._cv:
                self._cache[key] = got
                self._busy = None
                self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.join()
