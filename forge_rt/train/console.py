"""What the operator sees and sends while a run trains: progress (a rich live view on a terminal, plain
lines otherwise) and SIGINT/SIGTERM handling that ends the run after a checkpoint."""
from __future__ import annotations

import signal
import sys
import time


class Stop:
    """While `deferring` (the training loop), SIGINT/SIGTERM set a flag: the loop checkpoints at the end
    of the current step and exits. Otherwise (evaluation), or on a second signal, they interrupt at once."""

    def __init__(self):
        self.signum = None
        self.deferring = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None or not self.deferring:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, writing a checkpoint, then exiting "
              "(send again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Progress:
    """Rich live view (progress bar + the monitor's memory panel) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, start: int, live: bool, log_every: int, monitor):
        self.total, self.log_every, self.t0, self.start = total, log_every, time.time(), start
        self.live = None
        if live and sys.stdout.isatty():
            self._start_live(total, start, monitor)

    def _start_live(self, total: int, start: int, monitor) -> None:
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TextColumn("mem {task.fields[mem]}"), TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-", mem="-")
        parts = [self.bar]
        if monitor is not None:
            from forge_rt.monitor import LivePanel
            parts.append(LivePanel(monitor))
        self.live = Live(Group(*parts), refresh_per_second=4)
        self.live.start()

    def update(self, rec: dict) -> None:
        mem = f"{rec['rss_bytes'] / 2**30:.2f} GiB"
        if self.live is not None:
            self.bar.update(self.task, completed=rec["step"], loss=f"{rec['loss']:.4f}",
                            tps=f"{rec['tokens_per_s']:.0f}", mem=mem)
            return
        done = rec["step"] - self.start
        if rec["step"] % self.log_every == 0 or rec["step"] == self.total:
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - rec["step"])
            print(f"step {rec['step']}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                  f"{rec['tokens_per_s']:.0f} tok/s mem {mem} eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
