"""The MemoryMap picture (matplotlib): pools stacked over time, system available memory and swap below,
phases shaded, peaks annotated, to a PNG of an exact pixel size."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from forge_rt.core.errors import require_extra

with require_extra("monitor", "the MemoryMap picture (forge_rt.monitor)"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

from forge_rt.monitor.replay import Record
from forge_rt.monitor.sources import POOLS
from forge_rt.monitor.view import fmt_bytes

PHASE_COLORS = {"forward": "#4c9be8", "backward": "#f28e2b", "optimizer": "#59a14f", "eval": "#b07aa1",
                "checkpoint": "#9c755f"}
_OTHER_PHASE_COLOR = "#bab0ac"


def _series(samples: list[dict], key: str):
    return np.array([s.get(key, 0) for s in samples], dtype=float)


def render(record: Record, out=None, size: tuple[int, int] = (1400, 800), dpi: int = 100) -> Path:
    """Draw the record to a PNG of exactly `size` pixels: pools stacked over time (top), system
    available memory and swap (bottom), phases shaded, peaks annotated. Returns the PNG's path."""
    if not record.samples:
        raise ValueError(f"{record.path}: no samples to draw (the run stopped before the first sample?)")
    out = Path(out) if out is not None else record.path.with_name("memory.png")
    samples = record.samples
    t = np.array([s["t"] for s in samples])
    peak_any = max(max(s.get(k, 0) for k in POOLS) for s in samples)
    unit, div = ("GiB", 2 ** 30) if peak_any >= 2 ** 30 else ("MiB", 2 ** 20)

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    zero = _draw_pools(top, record, t, div)
    top.set_ylabel(unit)
    _draw_available(bottom, record, t, div)
    bottom.set_ylabel(unit)
    step_starts = _draw_phases(top, bottom, record)
    fig.suptitle(_title(record, t, step_starts, zero), fontsize=10)
    fig.savefig(out, dpi=dpi)
    return out


def _draw_pools(top, record: Record, t, div: float) -> list[str]:
    """Stacked pools with their peaks annotated; returns the names of pools that stayed at zero."""
    samples = record.samples
    # The compressed paging pool lives inside the process, so RSS is split around it.
    # A pool that stayed at zero the whole run is named in the title instead of drawn.
    has = {k for s in samples for k, v in s.items() if v}
    zero = [POOLS[k] for k in POOLS if k not in has and any(k in s for s in samples)]
    compressed = _series(samples, "page_compressed")
    layers = [("process RSS" + (" (rest)" if "page_compressed" in has else ""),
               np.maximum(_series(samples, "rss") - compressed, 0), "#8cb4d9")]
    if "page_compressed" in has:
        layers.append(("paged, in memory (LZ4, inside RSS)", compressed, "#e15759"))
    if "page_spilled" in has:
        layers.append(("paged, on disk", _series(samples, "page_spilled"), "#76b7b2"))
    if "cuda_reserved" in has:
        layers.append(("CUDA reserved", _series(samples, "cuda_reserved"), "#edc948"))
    top.stackplot(t, *[v / div for _, v, _ in layers], labels=[n for n, _, _ in layers],
                  colors=[c for _, _, c in layers], alpha=0.85)
    stack_top = np.cumsum([v for _, v, _ in layers], axis=0)
    # (name, own values, plotted height): a stacked layer's arrow points at its top edge.
    rss = _series(samples, "rss")
    peaks = [("RSS", rss, rss)]
    if "page_raw" in has:
        raw = _series(samples, "page_raw")
        top.plot(t, raw / div, color="#b62b2b", ls="--", lw=1.2, label="paged, raw size (before LZ4)")
        peaks.append(("paged raw", raw, raw))
    if "cuda_allocated" in has:
        top.plot(t, _series(samples, "cuda_allocated") / div, color="#8c6d00", lw=1, label="CUDA allocated")
    for i, (name, own, _) in enumerate(layers[1:], 1):
        peaks.append((name.split(" (")[0], own, stack_top[i]))
    budget = record.header.get("budget_bytes")
    if budget:
        top.axhline(budget / div, color="black", ls=":", lw=1, label=f"budget {fmt_bytes(budget)}")
    _annotate_peaks(top, record, t, div, peaks)
    drawn = max(max(float(h.max()) for _, _, h in peaks), float(stack_top[-1].max()))
    top.set_ylim(0, max(drawn / div * (1.2 + 0.08 * len(peaks)), (budget or 0) / div * 1.1) or 1)
    top.margins(x=0)
    return zero


def _annotate_peaks(top, record: Record, t, div: float, peaks) -> None:
    for i, (name, own, height) in enumerate(peaks):
        j = int(np.argmax(own))
        phase, step = record.phase_at(t[j])
        where = "" if phase is None else f", {phase}" + ("" if step is None else f" step {step}")
        # Labels stacked in the top-right corner, arrows to the points: they never cover each other.
        top.annotate(f"peak {name} {fmt_bytes(own[j])}{where}", xy=(t[j], height[j] / div),
                     xytext=(0.99, 0.95 - 0.075 * i), textcoords="axes fraction", fontsize=8, ha="right", va="top",
                     arrowprops={"arrowstyle": "->", "lw": 0.7, "alpha": 0.7},
                     bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.85, "lw": 0.3})


def _draw_available(bottom, record: Record, t, div: float) -> None:
    samples = record.samples
    avail = _series(samples, "mem_available")
    bottom.plot(t, avail / div, color="#4e79a7", lw=1.2, label="system available")
    if any(s.get("swap_used") for s in samples):
        bottom.plot(t, _series(samples, "swap_used") / div, color="#e15759", lw=1, label="swap used")
    if warn := record.header.get("warn_available"):
        bottom.axhline(warn / div, color="red", ls="--", lw=0.8, label=f"warning under {fmt_bytes(warn)}")
    j = int(np.argmin(avail))
    left = t[j] > 0.6 * t[-1]
    bottom.annotate(f"lowest {fmt_bytes(avail[j])}", xy=(t[j], avail[j] / div), xytext=(-10 if left else 10, -14),
                    textcoords="offset points", ha="right" if left else "left", fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.8})
    bottom.set_ylim(0, max(avail.max() / div * 1.1, 1e-9))
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="lower left", fontsize=8)


def _draw_phases(top, bottom, record: Record) -> dict:
    """Phases shaded behind both plots, step numbers along the top when they fit, the top legend;
    returns {step: start time}."""
    spans = record.phase_spans()
    by_phase: dict[str, list] = {}
    for t0, t1, phase, _ in spans:
        if phase != "idle":
            by_phase.setdefault(phase, []).append((t0, t1 - t0))
    for ax in (top, bottom):
        for phase, ranges in by_phase.items():
            ax.broken_barh(ranges, (0, 1), transform=ax.get_xaxis_transform(),
                           color=PHASE_COLORS.get(phase, _OTHER_PHASE_COLOR), alpha=0.18, lw=0, zorder=0)
    step_starts = {}
    for t0, _, phase, step in spans:
        if step is not None and step not in step_starts:
            step_starts[step] = t0
    if 0 < len(step_starts) <= 40:
        for step, t0 in step_starts.items():
            top.text(t0, 1.01, str(step), transform=top.get_xaxis_transform(), fontsize=7, ha="left")
    handles, labels = top.get_legend_handles_labels()
    handles += [Patch(color=PHASE_COLORS.get(p, _OTHER_PHASE_COLOR), alpha=0.35) for p in by_phase]
    labels += [f"phase: {p}" for p in by_phase]
    top.legend(handles, labels, loc="upper left", fontsize=8, ncol=2, framealpha=0.85)
    return step_starts


def _title(record: Record, t, step_starts: dict, zero: list[str]) -> str:
    missing = [k for k, v in record.header.get("sources", {}).items() if v != "ok"]
    title = f"MemoryMap: {record.path.parent.name or record.path.name}, {len(record.samples)} samples over {t[-1]:.1f} s"
    if step_starts:
        title += f", steps {min(step_starts)}-{max(step_starts)} (numbers on top)"
    notes = ([f"not sampled: {', '.join(missing)}"] if missing else []) + ([f"zero throughout: {', '.join(zero)}"]
                                                                         if zero else [])
    if notes:
        title += "\n" + "; ".join(notes)
    return title
