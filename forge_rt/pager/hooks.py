"""The Pager: saved-tensor hooks that keep, compress, or spill what autograd saves for backward.

Its state is split by job: the books (`ledger.Ledger`: totals, steps, bytes held), the disk tier
(`tier.DiskTier`: spill file, its threads, what is on disk), and here the hooks with what only they
need (the codec, the residents in saving order, the dedup table). One lock covers all three.

A paged record lives as long as its autograd graph. Its end is learnt from a `weakref.finalize`, which
only queues the record's key (it may run on any thread, at any allocation); the books are settled
under the lock at the next hook call, `stats()` or `close()`. `close()` (or leaving the `with` block)
stops the threads, closes the spill file and settles everything."""
from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref

import torch

from forge_rt.pager.codec import TensorCodec
from forge_rt.pager.heap import HeapTrimmer
from forge_rt.pager.ledger import Ledger
from forge_rt.pager.record import PagedRecord
from forge_rt.pager.tier import DiskTier


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
        self._lock = threading.RLock()
        self._ledger = Ledger()
        self._tier: DiskTier | None = None
        self._ids = itertools.count()
        self._dead: collections.deque[int] = collections.deque()  # keys of records their graph has freed
        self._resident: collections.OrderedDict[int, weakref.ref] = collections.OrderedDict()  # oldest first
        self._dedup: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self._hooks = None

    @property
    def steps(self) -> list[dict]:
        """One record per end_step()."""
        return self._ledger.steps

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "Pager":
        if self.spill_dir is not None:
            self._tier = DiskTier(self.spill_dir, self.spill_reserve, self.direct_io, self.prefetch, self._lock,
                                  self._ledger, self._trimmer)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self.close()

    def close(self) -> None:
        """Stops the spill threads (after the writes already queued), closes the spill file and settles the
        records freed so far. Idempotent; a spilled record unpacked after it raises PagingError."""
        if self._tier is not None:
            self._tier.close()
        with self._lock:
            self._drain()

    # -- stats -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            self._drain()
            s = self._ledger.snapshot()
            s.update(self._tier.stats() if self._tier else
                     {"write_s": 0.0, "read_s": 0.0, "spill_file_bytes": 0, "spilled_now_bytes": 0})
            s["heap_trims"] = self._trimmer.calls if self._trimmer else 0
            s["codec"] = f"bitshuffle+lz4 (nvCOMP CPU, {self.codec.threads} threads)"
            return s

    def end_step(self) -> dict:
        """Closes the current step's record (deltas since the previous end_step) and returns it."""
        return self._ledger.end_step(self.stats())

    def flush(self) -> None:
        """Waits until every queued spill write has landed (or failed: then raises)."""
        if self._tier is not None:
            self._tier.flush()

    # -- hooks ----------------------------------------------------------------------------------
    def _keep(self, t: torch.Tensor) -> bool:
        return (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided
                or t.device.type != "cpu" or t.is_quantized or t.is_conj() or t.is_neg()
                or t.numel() * t.element_size() < self.min_bytes or _is_parameter(t))

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        with self._lock:
            self._drain()
            if self._tier is not None and self._tier.error is not None:
                raise self._tier.error
            self._ledger.add(tensors=1, bytes_saved=nbytes)
            if self._keep(t):
                self._ledger.add(bytes_kept=nbytes)
                return t
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                   t.dtype, t._version)
            hit = self._dedup.get(key)
            if hit is not None and hit[0]() is t and hit[1]() is not None:
                self._ledger.add(dedup_hits=1)
                return hit[1]()
        rec, codec_s = self._encode(t)
        size = rec.resident_bytes()
        with self._lock:
            self._ledger.add(codec_s=codec_s, bytes_raw=nbytes)
            if rec.raw:
                self._ledger.add(bytes_incompressible=nbytes)
            else:
                self._ledger.add(bytes_compressed_raw=nbytes, bytes_compressed=size)
            self._dedup[key] = (weakref.ref(t), weakref.ref(rec))
            self._resident[rec.key] = weakref.ref(rec)
            self._ledger.hold(rec.key, size)
            fin = weakref.finalize(rec, self._dead.append, rec.key)  # holds the deque, not the Pager
            fin.atexit = False
            self._spill_over_budget()
        if self._trimmer is not None and self._tier is None and not rec.raw:
            self._trimmer.released(nbytes - size)  # compress-only: the raw tensor goes as the forward moves on
        return rec

    def _encode(self, t: torch.Tensor) -> tuple[PagedRecord, float]:
        """A record holding `t` compressed (or `t` itself where compression does not pay), and the codec's time."""
        op = t.grad_fn.name() if t.grad_fn else None
        rec = PagedRecord(next(self._ids), t, op)
        t0 = time.perf_counter()
        enc = self.codec.encode((t if rec.contiguous else t.contiguous()).view(-1), (op, t.dtype, t.shape))
        codec_s = time.perf_counter() - t0
        if enc is None:
            rec.blob = t
        else:
            rec.raw, rec.blob, rec.half = False, enc.pieces, enc.half
            rec.lens = [p.numel() for p in enc.pieces]
        return rec, codec_s

    def _unpack(self, rec):
        if isinstance(rec, torch.Tensor):
            return rec
        blob = rec.blob
        if blob is not None and rec.raw:
            return blob  # kept in memory as it was
        if blob is None:
            blob = self._tier.read_back(rec)
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
            self._ledger.add(codec_s=time.perf_counter() - t0)
        return out

    # -- residents (caller holds the lock) -------------------------------------------------------
    def _spill_over_budget(self) -> None:
        """Queues the oldest resident records (needed last by backward) until the budget holds."""
        if self.budget_bytes is None:
            return
        tier = self._tier
        while self._ledger.resident - tier.queued_bytes > self.budget_bytes and self._resident:
            _, ref = self._resident.popitem(last=False)
            rec = ref()
            if rec is not None and rec.blob is not None:
                tier.queue(rec)
        # Backpressure: do not let unwritten blobs grow past the budget again.
        tier.wait_until_queued_under(max(self.budget_bytes, 16 * 2**20))

    def _drain(self) -> None:
        """Settles the records their graph has freed since the last call (the finalizers only queue keys)."""
        if not self._dead:
            return
        while self._dead:
            key = self._dead.popleft()
            self._resident.pop(key, None)
            self._ledger.let_go(key)
            if self._tier is not None:
                self._tier.forget(key)
        for k in [k for k, (_, rref) in self._dedup.items() if rref() is None]:
            del self._dedup[k]


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
