"""`python -m forge_rt.memmap RUN_DIR`: replay a MemoryMap record -> RUN_DIR/memory.png + peak table.

`--watch RUN_DIR` follows a run in progress (the live panel, from another terminal) and renders the
picture when the run stops or on Ctrl-C. Corrupt or truncated lines are skipped with a warning.
The flags parse without the `monitor` extra (rich, matplotlib); the work needs it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from forge_rt.cli.common import run_command


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forge_rt.memmap", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="run directory holding memory.jsonl (or the .jsonl itself)")
    ap.add_argument("--watch", action="store_true", help="follow a run in progress; draw when it stops")
    ap.add_argument("--out", help="PNG path (default: memory.png next to memory.jsonl)")
    ap.add_argument("--size", default="1400x800", help="picture size in pixels, WxH (default 1400x800)")
    ap.add_argument("--interval", type=float, default=1.0, help="--watch: seconds between reads (default 1)")
    args = ap.parse_args(argv)
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        if len(size) != 2 or min(size) < 100:
            raise ValueError
    except ValueError:
        ap.error(f"--size {args.size!r}: give WIDTHxHEIGHT in pixels, each at least 100, e.g. 1400x800")
    return run_command(lambda: _replay(args, size))


def _replay(args, size: tuple[int, int]) -> int:
    from forge_rt.monitor.replay import load, summary
    from forge_rt.monitor.ui import panel, plot  # the monitor extra (rich, matplotlib): MissingExtra if absent
    console = panel.Console()
    record = _follow(Path(args.run_dir), console, args.interval) if args.watch else load(args.run_dir)
    if not record.samples:
        console.print(f"{record.path}: no samples yet, nothing to draw", markup=False)
        return 1
    png = plot.render(record, args.out, size=size)
    console.print(panel.summary_table(summary(record)))
    console.print(f"wrote {png}", markup=False)
    return 0


def _follow(path: Path, console, interval: float):
    """Follows a growing record with the live panel until the run stops (or Ctrl-C); returns the Record."""
    from forge_rt.monitor.replay import RecordFollower
    from forge_rt.monitor.ui.panel import live
    follower = RecordFollower(path)
    if not follower.path.exists():
        console.print(f"waiting for {follower.path} ...", markup=False)
    with live(follower, console=console, plain_interval=max(interval, 5.0)):
        try:
            while not follower.finished:
                follower.poll()
                time.sleep(interval)
        except KeyboardInterrupt:
            pass
    follower.poll()
    return follower.record
