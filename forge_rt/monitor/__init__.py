"""MemoryMap: a 10 Hz memory sampler with phase marks (`sampler`), its sources (`sources`: /proc, CUDA,
tegrastats, the pager), the running state an operator sees (`view`), reading a record back (`replay`),
the transformers Trainer callback (`hf`), and what is drawn with the `monitor` extra (`ui/`: the live
panel and peak table in rich, the picture in matplotlib; `python -m forge_rt.memmap`). Sampling and
replay need no extra."""
from __future__ import annotations

from forge_rt.monitor.sampler import PHASES, MemoryMonitor, record_path, watch
from forge_rt.monitor.sources import POOLS

__all__ = ["MemoryMonitor", "watch", "ForgeMemoryCallback", "LivePanel", "live", "record_path", "PHASES", "POOLS"]


def __getattr__(name: str):
    # The Trainer callback pulls in transformers, the panel rich; load them only for those who ask.
    if name == "ForgeMemoryCallback":
        from forge_rt.monitor.hf import ForgeMemoryCallback
        return ForgeMemoryCallback
    if name in ("LivePanel", "live"):
        from forge_rt.monitor.ui import panel
        return getattr(panel, name)
    raise AttributeError(f"module 'forge_rt.monitor' has no attribute {name!r}")
