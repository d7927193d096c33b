"""MemoryMap: a 10 Hz memory sampler with phase marks (`sampler`), its sources (`sources`: /proc, CUDA,
tegrastats, the pager), the live panel (`view`), record replay and plot (`replay`, also
`python -m forge_rt.memmap`) and the transformers Trainer callback (`hf`)."""
from __future__ import annotations

from forge_rt.monitor.sampler import PHASES, MemoryMonitor, record_path, watch
from forge_rt.monitor.sources import POOLS
from forge_rt.monitor.view import LivePanel, live

__all__ = ["MemoryMonitor", "watch", "ForgeMemoryCallback", "LivePanel", "live", "record_path", "PHASES", "POOLS"]


def __getattr__(name: str):
    # The Trainer callback pulls in transformers; load it only for those who ask.
    if name == "ForgeMemoryCallback":
        from forge_rt.monitor.hf import ForgeMemoryCallback
        return ForgeMemoryCallback
    raise AttributeError(f"module 'forge_rt.monitor' has no attribute {name!r}")
