"""What this machine does per second, measured once and cached: fp32 matmul FLOP/s, the paging codec's
compression rate on activation-like data, and sequential write speed to the spill directory. The
planner turns shapes into seconds with these; a probe takes a few seconds."""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from forge_rt.core.atomic import write_atomic

CACHE = Path(os.environ.get("FORGE_RT_CACHE", Path.home() / ".cache" / "forge_rt")) / "probe.json"


def _key() -> str:
    return f"{platform.node()}|{platform.processor() or platform.machine()}|threads={torch.get_num_threads()}"


def _best_of(fn, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _matmul_flops() -> float:
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    return 2 * 512 * 1024 * 1024 / _best_of(lambda: a @ b)


def _codec_bytes_per_s() -> float | None:
    try:
        from forge_rt.pager import TensorCodec
        codec = TensorCodec()
    except Exception:  # no native extension: paging is unavailable anyway
        return None
    x = torch.randn(4 << 20) * torch.rand(4 << 20)  # activation-like: varied exponents
    return x.numel() * 4 / _best_of(lambda: codec.encode(x))


def _disk_bytes_per_s(directory: str | None) -> float:
    data = os.urandom(32 << 20)
    with tempfile.NamedTemporaryFile(dir=directory) as fh:
        t = time.perf_counter()
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        return len(data) / (time.perf_counter() - t)


def probe(spill_dir: str | None = None, refresh: bool = False) -> dict:
    """{"flops": fp32 FLOP/s, "codec": bytes/s or None, "disk": bytes/s}, from the cache when present."""
    key = _key()
    cache = {}
    if CACHE.exists():
        try:
            cache = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            cache = {}
    if not refresh and key in cache:
        return cache[key]
    rates = {"flops": _matmul_flops(), "codec": _codec_bytes_per_s(), "disk": _disk_bytes_per_s(spill_dir)}
    cache[key] = rates
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(CACHE, json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home only costs the next run a new probe
    return rates
