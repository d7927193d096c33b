"""The case families of the suite, one module each. A family module has `ESTIMATE_S` (seconds per suite, for
the progress line) and `run(ctx) -> list[rows]` (forge_rt.bench.record.row); it raises `Skip` when it cannot
run on this machine (a missing optional package, no model). Microbenchmark families also hold pytest-benchmark
test functions, parametrized by their `cases(ctx, test_name)`."""
from __future__ import annotations

import importlib
import importlib.util

FAMILIES = ("kernels", "nf4", "paging", "step", "memory", "generate")
# generate loads SmolLM2 twice (forge_rt and llama.cpp): over a minute here, so only the full suite runs it
# unless asked for with --only; tiny (the test's suite) leaves out the step family's one process per configuration.
# memory trains the demo job once per memory mode and at long context: full suite or --only memory.
DEFAULT = {"tiny": FAMILIES[:3], "quick": FAMILIES[:4], "full": FAMILIES}


class Skip(Exception):
    """The family cannot run here; the message says why (it goes into the record)."""


def family(name: str):
    return importlib.import_module(f"forge_rt.bench.cases.{name}")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
