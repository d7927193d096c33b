"""The trainer: `config` (flags and files), `data` (loading, tokenizing), `model` (load, build, rebuild a
run), `loop` (optimizer steps, checkpoints), `run` (one run, orchestrated), `checkpoint`, `evaluate`,
`report`, `console` (progress, signals). `main` is `python -m forge_rt.train`."""
from __future__ import annotations

import os
import sys

from forge_rt.errors import ForgeError


def main(argv: list[str] | None = None) -> int:
    from forge_rt.train import checkpoint as ckpt
    from forge_rt.train.config import resolve
    from forge_rt.train.model import check_model_path
    from forge_rt.train.run import load_inputs, offline_guard, prepare_run_dir, run_training
    place = None
    umask = os.umask(0o077)  # everything the run writes is owner-only
    try:
        cfg, resume = resolve(argv)
        if cfg.isolate:
            from forge_rt.sovereign import isolate
            if not isolate.inside():  # the child, in the namespace, trains
                return isolate.run_isolated([sys.executable, "-m", "forge_rt.train",
                                               *(sys.argv[1:] if argv is None else argv)])
        if cfg.model is not None:
            check_model_path(cfg.model)
        inputs = load_inputs(cfg)  # every input checked before the run directory is touched
        with offline_guard() as guard:
            place = prepare_run_dir(cfg, resume)
            return run_training(cfg, place, inputs, resume, guard)
    except KeyboardInterrupt:
        resumable = place is not None and ckpt.latest_checkpoint(place.path / "checkpoints") is not None
        hint = f"; continue with --resume {place.path}" if resumable else (place.discard_if_empty() if place else "")
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    except ForgeError as exc:
        left = place.discard_if_empty() if place is not None else ""
        print(f"error: {exc}{left}", file=sys.stderr)
        return 2
    finally:
        os.umask(umask)
