"""The trainer: `config` (flags and files), `data` (loading, tokenizing), `model` (load, build, rebuild a
run), `loop` (optimizer steps, checkpoints), `run` (one run, orchestrated), `checkpoint`, `evaluate`,
`report`, `console` (progress, signals). `main` is `python -m forge_rt.train`."""
from __future__ import annotations

import os
import sys

from forge_rt.errors import ForgeError


def main(argv: list[str] | None = None) -> int:
    from forge_rt.train import checkpoint as ckpt
    from forge_rt.train import distributed
    from forge_rt.train.config import resolve
    from forge_rt.train.model import check_model_path
    from forge_rt.train.run import load_inputs, offline_guard, run_training, share_run_dir
    place, dist = None, distributed.SINGLE
    umask = os.umask(0o077)  # everything the run writes is owner-only
    try:
        cfg, resume = resolve(argv)
        dist = _join(cfg)  # [distributed] under torchrun: this rank among the others
        if cfg.isolate:
            from forge_rt.sovereign import isolate
            if not isolate.inside():  # the child, in the namespace, trains
                return isolate.run_isolated([sys.executable, "-m", "forge_rt.train",
                                               *(sys.argv[1:] if argv is None else argv)])
        if cfg.model is not None:
            check_model_path(cfg.model)
        inputs = load_inputs(cfg)  # every input checked before the run directory is touched
        with offline_guard(allow=[dist.master] if dist.enabled else []) as guard:
            place = share_run_dir(cfg, resume, dist)
            return run_training(cfg, place, inputs, resume, guard, dist)
    except KeyboardInterrupt:
        resumable = place is not None and ckpt.latest_checkpoint(place.path / "checkpoints") is not None
        hint = f"; continue with --resume {place.path}" if resumable else (place.discard_if_empty() if place else "")
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    except ForgeError as exc:
        left = place.discard_if_empty() if place is not None else ""
        if not exc.reported:  # a lost peer is said where it is found
            print(f"error: {exc}{left}", file=sys.stderr)
        elif left:
            print(left.lstrip("; "), file=sys.stderr)
        return 2
    finally:
        distributed.teardown(dist)
        os.umask(umask)


def _join(cfg):
    """The rank's place under torchrun; ranks past 0 print nothing but errors (rank 0 speaks for the run)."""
    from forge_rt.train import distributed
    dist = distributed.init(cfg.dist_backend, cfg.dist_timeout)
    if dist.enabled and cfg.isolate:
        raise distributed.DistributedError(
            "--isolate cannot be combined with torchrun: a new network namespace cuts the ranks off from their "
            "rendezvous; isolate the whole launch instead (e.g. unshare --net for a single-node torchrun)")
    if not dist.is_main:
        sys.stdout = open(os.devnull, "w")
    return dist
