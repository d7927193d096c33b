"""The Pager: saved-tensor hooks that keep, compress, or spill what autograd saves for backward."""
from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time
import weakref

import torch

from forge_rt.pager.codec import PagingError, TensorCodec
from forge_rt.pager.heap import HeapTrimmer
from forge_rt.pager.spill import Extent, Reader, SpillFile, Writer

_COUNTERS = ("tensors", "bytes_saved", "bytes_kept", "bytes_raw", "bytes_compressed_raw", "bytes_compressed",
             "bytes_incompressible", "bytes_spilled", "bytes_read_back", "dedup_hits", "codec_s",
             "write_s", "read_s", "stall_s", "heap_trims")


class _Record:
    """What a pack hook returns for a paged tensor; the autograd graph owns it, so it dies with the graph."""

    __slots__ = ("key", "name", "dtype", "shape", "stride", "contiguous", "nbytes", "half", "blob", "raw",
                 "lens", "extent", "pager", "__weakref__")

    def __init__(self, key: int, t: torch.Tensor, op: str | None, pager: "Pager"):
        self.key = key
        self.name = f"#{key} ({op or 'leaf'}, {str(t.dtype)[6:]}{list(t.shape)})"
        self.dtype, self.shape, self.stride = t.dtype, t.shape, t.stride()
        self.contiguous = t.is_contiguous()
        self.nbytes = t.numel() * t.element_size()
        self.half, self.raw, self.blob, self.extent = False, True, None, None
        self.lens: list[int] = []  # byte length of each piece of a compressed blob
        self.pager = weakref.ref(pager)

    def __del__(self):
        pager = self.pager()
        if pager is not None:
            pager._dead.append((self.key, self.extent, self.resident_bytes()))

    def resident_bytes(self) -> int:
        if self.blob is None:
            return 0
        return sum(self.lens) if not self.raw else self.blob.numel() * self.blob.element_size()


def _is_parameter(t: torch.Tensor) -> bool:
    base = t._base if t._is_view() else None
    return isinstance(t, torch.nn.Parameter) or isinstance(base, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)


class Pager:
    """Context manager installing the paging hooks. Use `forge_rt.paging(...)` to build one."""

    def __init__(self, budget_bytes: int | None = None, spill_dir: str | None = None, min_bytes: int = 262144,
                 prefetch: int = 8, level: int = 1, threads: int | None = None, min_ratio: float = 1.05,
                 spill_reserve: int = 64 * 2**20, release_memory: bool | None = None, direct_io: bool = True):
        if budget_bytes is not None and spill_dir is None:
            raise ValueError("paging(budget_bytes=...) needs spill_dir=... for what does not fit the budget")
        if prefetch < 0:
            raise ValueError(f"paging(prefetch={prefetch}): use 0 or more")
        self.budget_bytes = budget_bytes
        self.spill_dir = spill_dir
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.spill_reserve = spill_reserve
        self.direct_io = direct_io
        # With a budget, memory is the point: hand freed heap back to the OS every 128 MiB released.
        self._trimmer = HeapTrimmer(128 << 20) if (budget_bytes is not None if release_memory is None
                                                    else release_memory) else None
        self.codec = TensorCodec(threads=threads, level=level, min_ratio=min_ratio)
        self.steps: list[dict] = []
        self._totals = dict.fromkeys(_COUNTERS, 0)
        self._step_start = dict(self._totals)
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._dead: collections.deque = collections.deque()  # (key, extent, resident) of freed records
        self._resident: collections.OrderedDict[int, weakref.ref] = collections.OrderedDict()
        self._resident_bytes = 0
        self._peak_resident = 0
        self._queued_bytes = 0
        self._spilled: list[int] = []  # keys on disk, ascending = order of saving
        self._extents: dict[int, tuple[Extent, str]] = {}
        self._dedup: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self._error: PagingError | None = None
        self._drained = threading.Condition(self._lock)
        self._spill = self._writer = self._reader = None
        self._hooks = None

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "Pager":
        if self.spill_dir is not None:
            self._spill = SpillFile(self.spill_dir, self.spill_reserve, direct=self.direct_io)
            self._writer = Writer(self._spill, self._written)
            self._reader = Reader(self._spill)
            self._writer.start()
            self._reader.start()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        if self._spill is not None:
            self._writer.stop()
            self._reader.stop()
            self._spill.close()
        with self._lock:
            self._drain()

    # -- stats -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            self._drain()
            s = dict(self._totals)
            s["write_s"] = self._writer.seconds if self._writer else 0.0
            s["read_s"] = self._reader.seconds if self._reader else 0.0
            s["heap_trims"] = self._trimmer.calls if self._trimmer else 0
            s["ratio"] = s["bytes_compressed_raw"] / s["bytes_compressed"] if s["bytes_compressed"] else 1.0
            s["resident_bytes"] = self._resident_bytes
            s["peak_resident_bytes"] = self._peak_resident
            s["spill_file_bytes"] = self._spill.size if self._spill else 0
            s["spilled_now_bytes"] = sum(e.length for e, _ in self._extents.values())
            s["codec"] = f"bitshuffle+lz4 (nvCOMP CPU, {self.codec.threads} threads)"
            return s

    def end_step(self) -> dict:
        """Closes the current step's record (deltas since the previous end_step) and returns it."""
        s = self.stats()
        rec = {k: s[k] - self._step_start[k] for k in _COUNTERS}
        rec["ratio"] = rec["bytes_compressed_raw"] / rec["bytes_compressed"] if rec["bytes_compressed"] else 1.0
        rec["peak_resident_bytes"] = self._peak_resident
        rec["step"] = len(self.steps)
        self._step_start = {k: s[k] for k in _COUNTERS}
        self._peak_resident = self._resident_bytes
        self.steps.append(rec)
        return rec

    def flush(self) -> None:
        """Waits until every queued spill write has landed (or failed: then raises)."""
        with self._lock:
            while self._queued_bytes > 0 and self._error is None:
                self._drained.wait(timeout=1.0)
            if self._error is not None:
                raise self._error

    # -- hooks ----------------------------------------------------------------------------------
    def _keep(self, t: torch.Tensor) -> bool:
        return (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided
                or t.device.type != "cpu" or t.is_quantized or t.is_conj() or t.is_neg()
                or t.numel() * t.element_size() < self.min_bytes or _is_parameter(t))

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        with self._lock:
            self._drain()
            if self._error is not None:
                raise self._error
            self._totals["tensors"] += 1
            self._totals["bytes_saved"] += nbytes
            if self._keep(t):
                self._totals["bytes_kept"] += nbytes
                return t
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                   t.dtype, t._version)
            hit = self._dedup.get(key)
            if hit is not None and hit[0]() is t and hit[1]() is not None:
                self._totals["dedup_hits"] += 1
                return hit[1]()
        op = t.grad_fn.name() if t.grad_fn else None
        rec = _Record(next(self._ids), t, op, self)
        t0 = time.perf_counter()
        enc = self.codec.encode((t if rec.contiguous else t.contiguous()).view(-1), (op, t.dtype, t.shape))
        codec_s = time.perf_counter() - t0
        if enc is None:
            rec.blob = t
        else:
            rec.raw, rec.blob, rec.half = False, enc.pieces, enc.half
            rec.lens = [p.numel() for p in enc.pieces]
        size = rec.resident_bytes()
        with self._lock:
            self._totals["codec_s"] += codec_s
            self._totals["bytes_raw"] += nbytes
            if rec.raw:
                self._totals["bytes_incompressible"] += nbytes
            else:
                self._totals["bytes_compressed_raw"] += nbytes
                self._totals["bytes_compressed"] += size
            self._dedup[key] = (weakref.ref(t), weakref.ref(rec))
            self._resident[rec.key] = weakref.ref(rec)
            self._add_resident(size)
            self._spill_over_budget()
        if self._trimmer is not None and self._spill is None and not rec.raw:
            self._trimmer.released(nbytes - size)  # compress-only: the raw tensor goes as the forward moves on
        return rec

    def _unpack(self, rec):
        if isinstance(rec, torch.Tensor):
            return rec
        blob = rec.blob
        if blob is not None and rec.raw:
            return blob  # kept in memory as it was
        if blob is None:
            blob = self._read_back(rec)
            if not rec.raw:
                blob = list(torch.split(blob, rec.lens))
        t0 = time.perf_counter()
        out = torch.empty(rec.shape, dtype=rec.dtype)
        if rec.raw:
            out.view(-1).view(torch.uint8).copy_(blob)
        else:
            self.codec.decode(blob, out, rec.half, rec.name)
        if not rec.contiguous:
            out = torch.empty_strided(rec.shape, rec.stride, dtype=rec.dtype).copy_(out)
        with self._lock:
            self._totals["codec_s"] += time.perf_counter() - t0
        return out

    # -- disk tier ------------------------------------------------------------------------------
    def _add_resident(self, n: int) -> None:
        self._resident_bytes += n
        self._peak_resident = max(self._peak_resident, self._resident_bytes)

    def _spill_over_budget(self) -> None:
        """Queues the oldest resident records (needed last by backward) until the budget holds."""
        if self.budget_bytes is None:
            return
        while self._resident_bytes - self._queued_bytes > self.budget_bytes and self._resident:
            key, ref = self._resident.popitem(last=False)
            rec = ref()
            if rec is None or rec.blob is None:
                continue
            self._queued_bytes += rec.resident_bytes()
            self._writer.submit(rec, lambda r=rec: _bytes_of(r), checksum=rec.raw)
        # Backpressure: do not let unwritten blobs grow past the budget again.
        while self._queued_bytes > max(self.budget_bytes, 16 * 2**20) and self._error is None:
            self._drained.wait(timeout=1.0)

    def _written(self, rec: _Record, extent: Extent | None, error: PagingError | None) -> None:
        with self._lock:
            n = rec.resident_bytes()
            self._queued_bytes -= n
            if error is not None:
                self._error = self._error or error
            else:
                rec.extent = extent
                rec.blob = None
                self._resident_bytes -= n
                self._extents[rec.key] = (extent, rec.name)
                bisect.insort(self._spilled, rec.key)
                self._totals["bytes_spilled"] += extent.length
            self._drained.notify_all()
        if self._trimmer is not None and error is None:
            self._trimmer.released(n)  # on the writer thread, outside the lock: the blob is gone by now

    def _read_back(self, rec: _Record) -> torch.Tensor:
        if self._spill is None or self._spill.fd < 0:
            raise PagingError(f"paged tensor {rec.name} was spilled, but the paging context has exited and "
                              "closed its spill file; run backward inside `with forge_rt.paging(...)`")
        with self._lock:
            i = bisect.bisect_left(self._spilled, rec.key)
            ahead = [(k, *self._extents[k]) for k in reversed(self._spilled[max(0, i - self.prefetch):i])]
        t0 = time.perf_counter()
        blob = self._reader.fetch(rec.key, rec.extent, rec.name)
        if ahead:
            self._reader.want(ahead)
        with self._lock:
            self._totals["stall_s"] += time.perf_counter() - t0
            self._totals["bytes_read_back"] += rec.extent.length
        return blob

    def _drain(self) -> None:
        """Settles records the graph has freed since the last call (their __del__ only queues them)."""
        if not self._dead:
            return
        while self._dead:
            key, extent, resident = self._dead.popleft()
            self._resident.pop(key, None)
            if extent is not None:
                self._extents.pop(key, None)
                i = bisect.bisect_left(self._spilled, key)
                if i < len(self._spilled) and self._spilled[i] == key:
                    self._spilled.pop(i)
                if self._spill is not None and self._spill.fd >= 0:
                    self._spill.release(extent)
                if self._reader is not None:
                    self._reader.forget(key)
            self._resident_bytes -= resident
        for k in [k for k, (tref, rref) in self._dedup.items() if rref() is None]:
            del self._dedup[k]


def _bytes_of(rec: _Record) -> list[torch.Tensor]:
    """The bytes to write for a record: its blob's pieces, or the raw tensor's bytes in logical order."""
    if not rec.raw:
        return rec.blob
    t = rec.blob.contiguous().view(-1)
    return [t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)]


def paging(budget_bytes: int | None = None, spill_dir: str | None = None, min_bytes: int = 262144,
           prefetch: int = 8, **kwargs) -> Pager:
    """Pages the tensors autograd saves for backward: keep small/parameter tensors, LZ4-compress the
    rest in memory, and spill the oldest to `spill_dir` when the resident total passes `budget_bytes`.

    Other keywords (Pager): prefetch (spilled tensors read ahead of backward), release_memory (hand
    freed heap back to the OS every 128 MiB spilled or saved by compression; on by default with a
    budget, where it is what brings peak RSS down; compress-only it trades step time for a smaller
    saving, so it is opt-in there), direct_io (O_DIRECT spill file, default where the filesystem
    allows it), threads, level, min_ratio.

    min_bytes is 256 KiB rather than 64 KiB: a one-chunk tensor costs a fixed share of codec work,
    and the many small saves of a step (LoRA's x@A^T) would cost far more codec time than their bytes.
    Measurements behind these defaults: bench/results/NOTES.md.

        with forge_rt.paging(budget_bytes=512 << 20, spill_dir="/tmp") as pager:
            loss = model(**batch).loss; loss.backward()
            pager.end_step()
    """
    return Pager(budget_bytes=budget_bytes, spill_dir=spill_dir, min_bytes=min_bytes, prefetch=prefetch, **kwargs)
