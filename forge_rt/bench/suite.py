"""One run of the suite: the chosen families one after another, each against its baseline, into one record
(the machine, the load before and after, the rows, and why a family was skipped)."""
from __future__ import annotations

import datetime
import sys
import tempfile
import time
import traceback
from pathlib import Path

from forge_rt.bench.cases import DEFAULT, FAMILIES, Skip, family
from forge_rt.core.errors import ForgeError


def families(suite: str, only: str | None) -> list[str]:
    """The suite's default families, or the comma-separated `only` ones."""
    if not only:
        return list(DEFAULT[suite])
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        raise ForgeError(f"--only: unknown families {', '.join(bad)} (choose from {', '.join(FAMILIES)})")
    return names


def run_suite(suite: str, device: str, names: list[str], threads: int | None = None) -> tuple[dict, int]:
    """Runs `names` on `device` ("auto": what env finds); returns (record, number of families that broke)."""
    import torch

    from forge_rt.bench import env
    from forge_rt.bench.record import SCHEMA
    from forge_rt.bench.runner import Context, Progress  # pytest-benchmark: the `test` extra
    if threads:
        torch.set_num_threads(threads)
    device = env.device_auto() if device == "auto" else device
    if device != "cpu" and not torch.cuda.is_available():
        raise ForgeError(f"--device {device}: torch sees no CUDA device; use --device cpu")
    mods = {n: family(n) for n in names}
    rec = {"schema": None, "suite": suite, "device": device, "argv": sys.argv[1:],
           "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "env": env.environment(), "loadavg": {"before": env.loadavg()}, "rows": [], "skipped": []}
    progress = Progress({n: m.ESTIMATE_S[suite] for n, m in mods.items()})
    errors, t0 = 0, time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forge_rt-bench-") as tmp:
        for name, mod in mods.items():
            ctx = Context(suite, device, Path(tmp), progress=progress)
            progress.start(name)
            try:
                rec["rows"] += mod.run(ctx)
            except Skip as why:
                rec["skipped"].append({"family": name, "why": str(why)})
            except Exception as exc:  # one broken family must not lose the others' figures
                traceback.print_exc()
                rec["skipped"].append({"family": name, "why": f"error: {type(exc).__name__}: {exc}"})
                errors += 1
            progress.end()
    rec.update(schema=SCHEMA, seconds=time.monotonic() - t0)
    rec["loadavg"]["after"] = env.loadavg()
    return rec, errors
