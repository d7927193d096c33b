"""The spill file: one preallocated file per Pager, blobs written to and read from extents of it (the
threads that do so ahead of and behind autograd are in `spillio`).

The file is unlinked as soon as it is opened, so it disappears when the run ends however it ends
(exception, SIGINT, even SIGKILL); only the open descriptor keeps its blocks.
"""
from __future__ import annotations

import bisect
import errno
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

import torch

from forge_rt.core.native import require_native
from forge_rt.pager.codec import PagingError

_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    crc: int | None  # CRC-32C of the bytes as written, checked after reading; None for codec blobs,
                     # whose per-chunk CRC-32C the decoder checks anyway


class _Extents:
    """First-fit allocator over the file with coalescing, so regions freed by one step are reused."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)] if size else []  # sorted (offset, length)

    def take(self, n: int) -> int | None:
        for i, (off, length) in enumerate(self._free):
            if length >= n:
                self._free[i:i + 1] = [(off + n, length - n)] if length > n else []
                return off
        return None

    def give(self, off: int, n: int) -> None:
        i = bisect.bisect(self._free, (off, n))
        self._free.insert(i, (off, n))
        merged: list[tuple[int, int]] = []
        for o, length in self._free[max(0, i - 1):i + 2]:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((o, length))
        self._free[max(0, i - 1):i + 2] = merged

    def grow(self, new_size: int) -> None:
        self.give(self.size, new_size - self.size)
        self.size = new_size


def _full_message(where: str, directory: str, exc: OSError) -> str:
    free = shutil.disk_usage(directory).free
    return (f"spill_dir {directory!r} is full ({where}: {os.strerror(exc.errno)}; {free / 2**20:.0f} MiB free). "
            "Free space there, point spill_dir at a larger disk, or raise budget_bytes so less spills.")


_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses in multiples of this
_BOUNCE = 8 << 20


def _crc32c(data: torch.Tensor, crc: int = 0) -> int:
    """The codec's CRC-32C (CPU instructions) of a contiguous uint8 tensor."""
    return require_native().paging.crc32c(data.data_ptr(), data.numel(), crc)


def _aligned(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of nbytes whose first byte sits on an _ALIGN boundary."""
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % _ALIGN
    return raw[start:start + nbytes]


class SpillFile:
    """The spill file. With `direct` (where the filesystem allows it) it is opened with O_DIRECT:
    spilled bytes go from our buffers to the disk, not into the page cache, which would keep them in
    RAM (on a Jetson, the GPU's RAM) and cost a kernel copy on the same cores as the step. Reads then
    come from the disk, which the reader's prefetch hides. Measured write/read speeds and step times:
    bench/results/NOTES.md."""

    def __init__(self, directory: str, reserve_bytes: int, direct: bool = True):
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise PagingError(f"spill_dir {directory!r} does not exist; create it or pass another directory")
        try:
            self.fd, self.path = tempfile.mkstemp(prefix="forge_rt-spill-", suffix=".bin", dir=directory)
        except OSError as exc:
            raise PagingError(f"spill_dir {directory!r} is not writable ({exc.strerror}); fix its permissions "
                              "or pass another directory") from None
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
            except OSError:  # tmpfs and some network filesystems refuse O_DIRECT: stay buffered
                pass
            else:
                os.close(self.fd)
                self.fd, self.direct = fd, True
        os.unlink(self.path)
        self._bounce = _aligned(_BOUNCE) if self.direct else None
        free = shutil.disk_usage(directory).free
        if free < reserve_bytes:
            os.close(self.fd)
            raise PagingError(f"spill_dir {directory!r} has {free / 2**20:.0f} MiB free but spill_reserve is "
                              f"{reserve_bytes / 2**20:.0f} MiB; free space there or lower spill_reserve")
        self.directory = directory
        self._extents = _Extents(0)
        self._lock = threading.Lock()
        try:
            self._grow(reserve_bytes)
        except PagingError:
            os.close(self.fd)
            raise

    # -- space -------------------------------------------------------------------------------
    def _grow(self, new_size: int) -> None:
        new_size = -(-new_size // _ALIGN) * _ALIGN  # O_DIRECT extents start on block boundaries
        try:
            os.posix_fallocate(self.fd, 0, new_size)
        except OSError as exc:
            if exc.errno in _FULL:
                raise PagingError(_full_message("preallocating the spill file", self.directory, exc)) from None
            raise PagingError(f"cannot preallocate the spill file in {self.directory!r}: {exc.strerror}") from None
        self._extents.grow(new_size)

    def allocate(self, n: int) -> int:
        with self._lock:
            off = self._extents.take(n)
            if off is None:
                self._grow(max(2 * self._extents.size, self._extents.size + n))
                off = self._extents.take(n)
            return off

    def _span(self, length: int) -> int:
        """File bytes an extent of `length` occupies (whole O_DIRECT blocks)."""
        return -(-length // _ALIGN) * _ALIGN if self.direct else length

    def release(self, extent: Extent) -> None:
        with self._lock:
            self._extents.give(extent.offset, self._span(extent.length))

    @property
    def size(self) -> int:
        return self._extents.size

    # -- I/O ---------------------------------------------------------------------------------
    def write(self, pieces: list[torch.Tensor], checksum: bool = True) -> Extent:
        """Writes contiguous uint8 tensors back to back as one extent; raises PagingError if the disk fills."""
        bufs = [memoryview(p.numpy()) for p in pieces]
        total = sum(len(b) for b in bufs)
        off = self.allocate(self._span(total))
        try:
            if self.direct:
                self._write_direct(bufs, off)
            else:
                at = off
                for buf in bufs:
                    self._pwrite_all(buf, at)
                    at += len(buf)
        except OSError as exc:
            self.release(Extent(off, total, 0))
            if exc.errno in _FULL:
                raise PagingError(_full_message("writing a spilled tensor", self.directory, exc)) from None
            raise PagingError(f"writing the spill file in {self.directory!r} failed: {exc.strerror}") from None
        crc = None
        if checksum:
            crc = 0
            for p in pieces:
                crc = _crc32c(p, crc)
        return Extent(off, total, crc)

    def _pwrite_all(self, buf: memoryview, at: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], at + done)

    def _write_direct(self, bufs: list[memoryview], at: int) -> None:
        """Packs the pieces through the aligned bounce buffer, one whole-block write per fill."""
        bounce = memoryview(self._bounce.numpy())
        fill = 0
        for buf in bufs:
            pos = 0
            while pos < len(buf):
                n = min(len(buf) - pos, _BOUNCE - fill)
                bounce[fill:fill + n] = buf[pos:pos + n]
                fill, pos = fill + n, pos + n
                if fill == _BOUNCE:
                    self._pwrite_all(bounce, at)
                    at, fill = at + _BOUNCE, 0
        if fill:
            span = self._span(fill)
            bounce[fill:span] = bytes(span - fill)  # the block's tail: zeros, never read back
            self._pwrite_all(bounce[:span], at)

    def read(self, extent: Extent, name: str) -> torch.Tensor:
        span = self._span(extent.length)
        out = _aligned(span) if self.direct else torch.empty(span, dtype=torch.uint8)
        buf = memoryview(out.numpy())
        got = 0
        while got < span:
            n = os.preadv(self.fd, [buf[got:]], extent.offset + got)
            if n == 0:
                break
            got += n
        if got < extent.length:
            raise PagingError(f"spill file {self.path!r} is truncated: paged tensor {name} needs bytes "
                              f"{extent.offset}..{extent.offset + extent.length} but the file ends at "
                              f"{os.fstat(self.fd).st_size}. Something else shrank the file; rerun the step.")
        out, buf = out[:extent.length], buf[:extent.length]
        if extent.crc is not None and _crc32c(out) != extent.crc:
            raise PagingError(f"paged tensor {name} read back from spill file {self.path!r} fails its CRC-32C check; "
                              "the disk returned different bytes than were written. Rerun the step.")
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
