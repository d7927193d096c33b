"""`python -m forge_rt.train`: offline QLoRA from a dataset to an evaluated adapter.

Default: SmolLM2-135M-Instruct (shipped GGUF, fp32) -> forge_rt NF4 quantization -> PEFT LoRA on all
linear layers -> forge_rt fused kernels (`accelerate`) -> activation paging, trained on the shipped
telemetry-triage demo and evaluated before and after. See `--help` for bringing your own model/data.
Every input is checked before the run directory is touched; the trainer itself is forge_rt.train."""
from __future__ import annotations

import os
import sys

from forge_rt.cli.common import offline_guard, say_error
from forge_rt.core import dist as distributed
from forge_rt.core.errors import ForgeError


def main(argv: list[str] | None = None) -> int:
    from forge_rt.models import check_model_path
    from forge_rt.train import checkpoint as ckpt
    from forge_rt.train.config import resolve
    from forge_rt.train.inputs import load_inputs
    from forge_rt.train.place import share_run_dir
    from forge_rt.train.run import run_training
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
    except ForgeError as exc:  # a lost peer is said where it is found (exc.reported)
        say_error(exc, place.discard_if_empty() if place is not None else "")
        return 2
    finally:
        distributed.teardown(dist)
        os.umask(umask)


def _join(cfg):
    """The rank's place under torchrun; ranks past 0 print nothing but errors (rank 0 speaks for the run)."""
    dist = distributed.init(cfg.dist_backend, cfg.dist_timeout)
    if dist.enabled and cfg.isolate:
        raise distributed.DistributedError(
            "--isolate cannot be combined with torchrun: a new network namespace cuts the ranks off from their "
            "rendezvous; isolate the whole launch instead (e.g. unshare --net for a single-node torchrun)")
    if not dist.is_main:
        sys.stdout = open(os.devnull, "w")
    return dist
