"""The disk tier of one Pager: its spill file with the writer and reader threads, and the index of what is
on disk (record keys in saving order, each with its extent). Backward needs the newest saves first, so
reading one record asks the reader for the `prefetch` saved just before it.

It shares the Pager's lock: the writer thread's callback, the pack hook's backpressure wait and the
Pager's books (Ledger) are all under that one lock, so a record is never counted twice or lost between
memory and disk."""
from __future__ import annotations

import bisect
import threading
import time

import torch

from forge_rt.pager.codec import PagingError
from forge_rt.pager.heap import HeapTrimmer
from forge_rt.pager.ledger import Ledger
from forge_rt.pager.record import PagedRecord
from forge_rt.pager.spill import Extent, SpillFile
from forge_rt.pager.spillio import Reader, Writer


class DiskTier:
    def __init__(self, directory: str, reserve_bytes: int, direct: bool, prefetch: int, lock: threading.RLock,
                 ledger: Ledger, trimmer: HeapTrimmer | None):
        self.file = SpillFile(directory, reserve_bytes, direct=direct)
        self.prefetch = prefetch
        self.queued_bytes = 0          # handed to the writer, not yet on disk
        self.error: PagingError | None = None
        self.spilled: list[int] = []   # keys on disk, ascending = order of saving
        self.extents: dict[int, tuple[Extent, str]] = {}
        self._lock, self._ledger, self._trimmer = lock, ledger, trimmer
        self._drained = threading.Condition(lock)
        self._writer = Writer(self.file, self._written)
        self._reader = Reader(self.file)
        self._writer.start()
        self._reader.start()

    @property
    def open(self) -> bool:
        return self.file.fd >= 0

    def close(self) -> None:
        """Stops both threads (the writer finishes its queue first) and closes the file. Idempotent."""
        if self.open:
            self._writer.stop()
            self._reader.stop()
            self.file.close()

    def stats(self) -> dict:
        return {"write_s": self._writer.seconds, "read_s": self._reader.seconds, "spill_file_bytes": self.file.size,
                "spilled_now_bytes": sum(e.length for e, _ in self.extents.values())}

    # -- writing (caller holds the lock) -----------------------------------------------------
    def queue(self, rec: PagedRecord) -> None:
        self.queued_bytes += rec.resident_bytes()
        self._writer.submit(rec, rec.pieces, checksum=rec.raw)

    def wait_until_queued_under(self, limit: int) -> None:
        """Backpressure: waits (releasing the lock) while more than `limit` bytes wait for the writer."""
        while self.queued_bytes > limit and self.error is None:
            self._drained.wait(timeout=1.0)

    def flush(self) -> None:
        """Waits until every queued write has landed (or failed: then raises)."""
        with self._lock:
            self.wait_until_queued_under(0)
            if self.error is not None:
                raise self.error

    def _written(self, rec: PagedRecord, extent: Extent | None, error: PagingError | None) -> None:
        with self._lock:
            n = rec.resident_bytes()
            self.queued_bytes -= n
            if error is not None:
                self.error = self.error or error
            else:
                rec.blob = None
                self._ledger.let_go(rec.key)
                self.extents[rec.key] = (extent, rec.name)
                bisect.insort(self.spilled, rec.key)
                self._ledger.add(bytes_spilled=extent.length)
            self._drained.notify_all()
        if self._trimmer is not None and error is None:
            self._trimmer.released(n)  # on the writer thread, outside the lock: the blob is gone by now

    # -- reading back and forgetting ---------------------------------------------------------
    def read_back(self, rec: PagedRecord) -> torch.Tensor:
        if not self.open:
            raise PagingError(f"paged tensor {rec.name} was spilled, but the paging context has exited and "
                              "closed its spill file; run backward inside `with forge_rt.paging(...)`")
        with self._lock:
            extent = self.extents[rec.key][0]
            i = bisect.bisect_left(self.spilled, rec.key)
            ahead = [(k, *self.extents[k]) for k in reversed(self.spilled[max(0, i - self.prefetch):i])]
        t0 = time.perf_counter()
        blob = self._reader.fetch(rec.key, extent, rec.name)
        if ahead:
            self._reader.want(ahead)
        with self._lock:
            self._ledger.add(stall_s=time.perf_counter() - t0, bytes_read_back=extent.length)
        return blob

    def forget(self, key: int) -> None:
        """A spilled record died with its graph: its extent goes back to the file (caller holds the lock)."""
        entry = self.extents.pop(key, None)
        if entry is None:
            return
        i = bisect.bisect_left(self.spilled, key)
        if i < len(self.spilled) and self.spilled[i] == key:
            self.spilled.pop(i)
        if self.open:
            self.file.release(entry[0])
        self._reader.forget(key)
