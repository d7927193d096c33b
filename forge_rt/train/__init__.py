"""The trainer: `config` (flags and files), `data` (loading, tokenizing), `model` (load, build, rebuild a
run), `loop` (optimizer steps, checkpoints), `run` (one run, orchestrated), `checkpoint`, `evaluate`,
`report`, `console` (progress, signals). `main` is `python -m forge_rt.train`."""
from __future__ import annotations

import sys

from forge_rt.errors import ForgeError


def main(argv: list[str] | None = None) -> int:
    from forge_rt.train import checkpoint as ckpt
    from forge_rt.train.config import resolve
    from forge_rt.train.model import check_model_path
    from forge_rt.train.run import offline_guard, prepare_run_dir, run_training
    run = None
    try:
        cfg, resume = resolve(argv)
        if cfg.model is not None:
            check_model_path(cfg.model)
        with offline_guard() as guard:
            run = prepare_run_dir(cfg, resume)
            return run_training(cfg, run, resume, guard)
    except KeyboardInterrupt:
        resumable = run is not None and ckpt.latest_checkpoint(run / "checkpoints") is not None
        hint = f"; continue with --resume {run}" if resumable else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    except ForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
