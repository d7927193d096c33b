"""Runs the chosen case families one after another: the context each case gets (suite, device, threads,
scratch folder), the progress line (case, time left), and the bridge to pytest-benchmark for the
microbenchmarks (a case module's test functions run under pytest, parametrized by the module's `cases`)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forge_rt.core.errors import require_extra

with require_extra("test", "the benchmark suite (its microbenchmarks run under pytest-benchmark)"):
    import pytest
    import pytest_benchmark  # noqa: F401 (the plugin behind run_pytest's --benchmark-* flags)


class Progress:
    """Time left = what the remaining families were estimated to take, scaled by how the finished ones fared."""

    def __init__(self, plan: dict[str, float], stream=None):
        self.plan, self.stream = plan, stream or sys.__stderr__
        self.t0 = time.monotonic()
        self.done_est = self.done_real = 0.0
        self.family, self.family_t0, self.frac = None, self.t0, 0.0

    def start(self, family: str) -> None:
        self.family, self.family_t0, self.frac = family, time.monotonic(), 0.0
        self.show(f"{family}: starting")

    def step(self, done: int, total: int, label: str) -> None:
        self.frac = done / max(total, 1)
        self.show(f"{self.family} {done + 1}/{total}: {label}")

    def end(self) -> None:
        self.done_est += self.plan[self.family]
        self.done_real += time.monotonic() - self.family_t0
        self.family = None

    def left(self) -> float:
        scale = min(max(self.done_real / self.done_est, 0.5), 3.0) if self.done_est > 1 else 1.0
        later = list(self.plan)[list(self.plan).index(self.family) + 1:] if self.family else []
        now = self.plan[self.family] * (1 - self.frac) if self.family else 0.0
        return scale * (now + sum(self.plan[f] for f in later))

    def show(self, what: str) -> None:
        el = time.monotonic() - self.t0
        print(f"[bench {el:5.0f} s, ~{self.left():4.0f} s left] {what}", file=self.stream, flush=True)


@dataclass
class Context:
    suite: str                      # tiny | quick | full
    device: str                     # cpu | cuda | jetson
    workdir: Path
    threads: int = field(default_factory=torch.get_num_threads)
    progress: Progress | None = None

    @property
    def torch_device(self) -> str:
        return "cpu" if self.device == "cpu" else "cuda"

    def pick(self, tiny, quick, full):
        return {"tiny": tiny, "quick": quick, "full": full}[self.suite]

    def sync(self) -> None:
        """Waits for queued GPU work, so a timer around a call measures the call."""
        if self.device != "cpu":
            torch.cuda.synchronize()


class _SuitePlugin:
    """Parametrizes a case module's tests with its `cases(ctx)` and hands them the context."""

    def __init__(self, ctx: Context):
        self._ctx, self.total, self.done = ctx, 0, 0

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            cases = metafunc.module.cases(self._ctx, metafunc.function.__name__)
            metafunc.parametrize("case", cases, ids=[c["id"] for c in cases])

    def pytest_collection_finish(self, session):
        self.total = len(session.items)

    def pytest_runtest_logstart(self, nodeid, location):
        if self._ctx.progress:
            self._ctx.progress.step(self.done, self.total, nodeid.split("::")[-1])
        self.done += 1

    @pytest.fixture
    def ctx(self):
        return self._ctx


def run_pytest(module, ctx: Context) -> list[dict]:
    """pytest-benchmark's records of `module`'s tests (each with its `extra_info` and `stats`, in seconds)."""
    name = module.__name__.rsplit(".", 1)[-1]
    out, ini = ctx.workdir / f"{name}.pytest.json", ctx.workdir / "pytest.ini"
    ini.write_text("[pytest]\n")
    args = [module.__file__, "-qq", "-p", "no:cacheprovider", "-c", str(ini), "--rootdir", str(ctx.workdir),
            "--import-mode=importlib", f"--benchmark-json={out}", "--benchmark-quiet", "-W", "ignore"]
    rc = pytest.main(args, plugins=[_SuitePlugin(ctx)])
    if rc not in (0, 5) or not out.exists():
        raise RuntimeError(f"{name}: pytest exited {rc}")
    return json.loads(out.read_text())["benchmarks"]
