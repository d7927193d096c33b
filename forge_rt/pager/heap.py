"""Gives freed heap memory back to the OS while spilling.

glibc keeps memory that autograd frees in the middle of its heap: with activations compressed and
spilled as the forward goes, RSS at the end of a forward sat far above what was live until
`malloc_trim(0)` gave it back (figures: bench/results/NOTES.md). Trimming after every so many
spilled bytes keeps RSS near what is live, at the price of page faults when the memory is reused.
Only glibc has malloc_trim; elsewhere this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _load_trim()


class HeapTrimmer:
    """Calls malloc_trim(0) once `every_bytes` have been released since the last call."""

    def __init__(self, every_bytes: int):
        self.every_bytes = every_bytes
        self.available = _TRIM is not None
        self.calls = 0
        self._pending = 0

    def released(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending < self.every_bytes or not self.available:
            return
        self._pending = 0
        _TRIM(0)  # ctypes drops the GIL for the call
        self.calls += 1


def trim_heap() -> bool:
    """Hands the heap's free pages back to the OS now (e.g. after a model was quantized and its
    full-precision weights freed); False where malloc_trim does not exist."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
