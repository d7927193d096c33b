"""Gives freed heap memory back to the OS: while spilling, and under a training run's RSS cap.

glibc keeps memory that autograd frees in the middle of its heap: with activations compressed and
spilled as the forward goes, RSS at the end of a forward sat far above what was live until
`malloc_trim(0)` gave it back (figures: bench/results/NOTES.md). Trimming after every so many
spilled bytes keeps RSS near what is live, at the price of page faults when the memory is reused.
Only glibc has malloc_trim; elsewhere this is a no-op.

The RSS cap exists because glibc's heap keeps what a training step frees: on the demo job (SmolLM2, 8 x 144
tokens, checkpointing) RSS climbed to 1.85 GiB while at most 0.95 GiB was live (the same run with glibc's
mmap threshold at 1 MiB, or with jemalloc, peaked there), so the planner's prediction could not be the peak.
Trimming at every decoder layer holds RSS to what is live but costs 30-40% of a step here (a trim walks the
heap, the pages come back as faults); trimming only when RSS is over the planner's prediction costs a few
trims per step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch


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


def resident_bytes() -> int:
    """This process's RSS from /proc/self/statm (0 where there is no /proc): cheap enough for every layer."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class RssCap:
    """Keeps RSS near `cap_bytes` where the heap's retained free memory is what holds it above: `check()`
    trims when RSS is over the cap. When a trim leaves RSS still over it (the live memory itself is larger),
    the cap moves up to that RSS plus `margin`, so checks never trim at every layer for nothing."""

    def __init__(self, cap_bytes: int, margin: float = 0.05):
        self.cap = int(cap_bytes)
        self.margin = margin
        self.available = _TRIM is not None
        self.trims = 0

    def check(self) -> None:
        if not self.available or resident_bytes() <= self.cap:
            return
        _TRIM(0)
        self.trims += 1
        after = resident_bytes()
        if after > self.cap:
            self.cap = int(after * (1 + self.margin))

    def watch(self, layers) -> list:
        """Checks before each layer's forward and before each layer's backward (a hook on the gradient of
        its output); returns the hook handles. `layers`: the model's decoder layers."""
        handles = []

        def before_forward(module, args):
            self.check()

        def after_forward(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad: self.check())

        for layer in layers:
            handles.append(layer.register_forward_pre_hook(before_forward))
            handles.append(layer.register_forward_hook(after_forward))
        return handles
