"""What the operator sees in a terminal (rich): the live panel of a `MemoryView` and the peak table of a
replayed record."""
from __future__ import annotations

import contextlib
import threading

from forge_rt.core.errors import require_extra

with require_extra("monitor", "the MemoryMap panel (forge_rt.monitor)"):
    from rich.console import Console, Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

from forge_rt.monitor.sources import POOLS
from forge_rt.monitor.view import MemoryView, fmt_bytes

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 30) -> str:
    """Values squeezed into `width` cells (max per cell, so short spikes survive), scaled min..max."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS)))] for v in values)


class LivePanel:
    """rich renderable: current & peak of each pool with a sparkline of the last minute, paging ratio,
    headroom, low-memory warning, missing sources. `plain_line()` is the same as one line of text."""

    def __init__(self, monitor, title: str = "memory", spark_width: int = 30):
        self.view: MemoryView = getattr(monitor, "view", monitor)
        self.title = title
        self.spark_width = spark_width

    def _phase(self) -> str:
        v = self.view
        if v.phase is None:
            return ""
        return v.phase if v.step is None else f"{v.phase} @ step {v.step}"

    def __rich__(self) -> Panel:
        sample, peaks = self.view.latest(), self.view.peaks()
        if sample is None:
            return Panel(Text("waiting for the first sample..."), title=self.title)
        table = Table(box=None, padding=(0, 1), show_edge=False)
        for col, just in (("pool", "left"), ("now", "right"), ("peak", "right"), ("last minute", "left")):
            table.add_column(col, justify=just)
        for key, label in POOLS.items():
            if key in sample:
                table.add_row(label, fmt_bytes(sample[key]), fmt_bytes(peaks.get(key)),
                              Text(sparkline(self.view.history(key), self.spark_width), style="cyan"))
        lines = [table]
        if "page_compressed" in sample:
            raw = f"raw {fmt_bytes(sample['page_raw'])} -> " if "page_raw" in sample else ""
            budget = self.view.header.get("paging_budget")
            lines.append(Text(f"paging ratio {sample.get('page_ratio', 0):.2f}x  ({raw}in memory "
                              f"{fmt_bytes(sample['page_compressed'])}, spilled {fmt_bytes(sample.get('page_spilled'))}"
                              + (f", budget {fmt_bytes(budget)})" if budget else ")")))
        label, room = self.view.headroom(sample)
        lines.append(Text(f"{label}: {fmt_bytes(room)}", style="red" if room is not None and room < 0 else ""))
        if self.view.warn_low(sample):
            lines.append(Text(f"WARNING: system available memory {fmt_bytes(sample['mem_available'])} is under "
                              f"{fmt_bytes(self.view.header['warn_available'])}", style="bold red"))
        missing = [f"{k} ({v[len('missing: '):]})" for k, v in self.view.header.get("sources", {}).items()
                   if v != "ok"]
        if missing:
            lines.append(Text("not sampled: " + "; ".join(missing), style="dim"))
        subtitle = self._phase() or None
        return Panel(Group(*lines), title=self.title, subtitle=subtitle, expand=False)

    def plain_line(self) -> str:
        sample, peaks = self.view.latest(), self.view.peaks()
        if sample is None:
            return f"[{self.title}] waiting for the first sample"
        parts = [f"[{self.title}] t={sample['t']:.1f}s"]
        if phase := self._phase():
            parts.append(phase)
        for key in ("rss", "cuda_reserved", "page_raw", "page_compressed", "page_spilled"):
            if key in sample:
                parts.append(f"{POOLS[key]} {fmt_bytes(sample[key])} (peak {fmt_bytes(peaks.get(key))})")
        if "page_ratio" in sample:
            parts.append(f"paging ratio {sample['page_ratio']:.2f}x")
        label, room = self.view.headroom(sample)
        parts.append(f"{label} {fmt_bytes(room)}")
        if self.view.warn_low(sample):
            parts.append("WARNING low memory")
        return " | ".join(parts)


@contextlib.contextmanager
def live(monitor, console: Console | None = None, above=(), plain_interval: float = 10.0, enabled: bool = True):
    """Show `monitor`'s panel while the block runs, under the renderables in `above` (e.g. a rich
    Progress). On a terminal: a rich Live display. Otherwise (logs, pipes, `enabled=False`): a plain
    text line every `plain_interval` seconds and at the end, with no escape codes."""
    console = console or Console()
    panel = LivePanel(monitor)
    if enabled and console.is_terminal:
        with Live(Group(*above, panel), console=console, refresh_per_second=2):
            yield panel
        return
    stop = threading.Event()

    def report():
        while not stop.wait(plain_interval):
            console.print(panel.plain_line(), markup=False, highlight=False, soft_wrap=True)

    thread = threading.Thread(target=report, name="forge_rt-memline", daemon=True)
    thread.start()
    try:
        yield panel
    finally:
        stop.set()
        thread.join()
        console.print(panel.plain_line(), markup=False, highlight=False, soft_wrap=True)


def summary_table(rows: list[dict]) -> Table:
    """The rows of forge_rt.monitor.replay.summary as a table."""
    table = Table(title="memory peaks")
    for col, just in (("pool", "left"), ("peak", "right"), ("at", "right"), ("phase", "left"), ("step", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r["label"], fmt_bytes(r["peak"]), f"{r['t']:.1f} s", r["phase"] or "-",
                      "-" if r["step"] is None else str(r["step"]))
    return table
