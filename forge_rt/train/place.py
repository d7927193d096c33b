"""Where a run writes: the run directory prepared (new, replacing an old one with --overwrite, or resumed),
shared with the other ranks, and the adapter and tokenizer saved into it atomically."""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from forge_rt.core.atomic import atomic_path
from forge_rt.core.dist import Dist
from forge_rt.core.errors import ForgeError
from forge_rt.train import checkpoint as ckpt
from forge_rt.train.config import TrainConfig


class RunError(ForgeError, RuntimeError):
    """A problem with the run itself (output directory, resume state), reported without a traceback."""


@dataclass
class RunPlace:
    """Where a run writes. With --overwrite it is built beside the old run (`replaces`), which is swapped out
    only once the new run has its adapter; a run that fails before its first checkpoint leaves no trace."""
    path: Path
    replaces: Path | None = None
    created: bool = False   # this invocation made the directory

    def swap_in(self) -> None:
        old = self.replaces.with_name(self.replaces.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(self.replaces, old)
        os.rename(self.path, self.replaces)
        shutil.rmtree(old)
        self.path, self.replaces = self.replaces, None

    def discard_if_empty(self) -> str:
        """After a failure: removes a new run that holds nothing resumable; says what is left where."""
        if self.replaces is None and not self.created:
            return ""
        untouched = f"; the previous run in {self.replaces} is untouched" if self.replaces else ""
        if ckpt.latest_checkpoint(self.path / "checkpoints") is not None:
            return f"; the new run's checkpoints are in {self.path}{untouched}"
        shutil.rmtree(self.path, ignore_errors=True)
        return untouched


def prepare_run_dir(cfg: TrainConfig, resume: str | None) -> RunPlace:
    if resume is not None:
        run = Path(resume)
        for name in ckpt.clean_partial(run / "checkpoints"):
            print(f"resume: removed the half-written checkpoint {run / 'checkpoints' / name}", flush=True)
        if ckpt.latest_checkpoint(run / "checkpoints") is None:
            raise RunError(f"--resume {run}: no checkpoint in {run / 'checkpoints'}; start a new run instead")
        return RunPlace(run)
    run = Path(cfg.output) if cfg.output else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    replaces = None
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        if not cfg.overwrite:
            raise RunError(f"output directory {run} exists; pass --overwrite to replace it or --resume {run} to continue it")
        if not run.is_dir():
            raise RunError(f"--output {run} is a file, not a directory; choose another --output")
        replaces, run = run, run.with_name(run.name + ".new")
        shutil.rmtree(run, ignore_errors=True)  # a leftover of an earlier --overwrite that failed
    place = RunPlace(run, replaces, created=not run.exists() or not any(run.iterdir()))
    try:
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        run.chmod(0o700)
        (run / "run_id").write_text(uuid.uuid4().hex + "\n")
    except OSError as exc:
        raise RunError(f"cannot write the run directory {run}: {exc.strerror or exc}; "
                       "choose a writable --output") from None
    return place


def share_run_dir(cfg: TrainConfig, resume: str | None, dist: Dist) -> RunPlace:
    """[distributed] prepare_run_dir on rank 0; the other ranks get its path only (rank 0 alone may swap or
    discard it) and make it where it is missing (another node), for their memory record."""
    place = dist.from_main(lambda: prepare_run_dir(cfg, resume), "the run directory's preparation")
    if dist.is_main:
        return place
    place.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return RunPlace(place.path)


def save_adapter(model, tok, run: Path) -> None:
    """adapter/ and tokenizer/, each written under a temporary name and renamed into place: a full disk
    leaves no half-written adapter, and the final checkpoint still holds the weights."""
    from safetensors import SafetensorError
    for name, obj in (("adapter", model), ("tokenizer", tok)):
        final = run / name
        try:
            with atomic_path(final, overwrite=True) as tmp:
                obj.save_pretrained(tmp)
                source = getattr(obj, "name_or_path", None) if name == "tokenizer" else None
                if source and (Path(source) / "tokenizer.model").is_file():  # save_pretrained leaves it out; a
                    shutil.copyfile(Path(source) / "tokenizer.model", Path(tmp) / "tokenizer.model")  # GGUF needs it
        except (OSError, SafetensorError) as exc:
            last = ckpt.latest_checkpoint(run / "checkpoints")
            raise RunError(f"could not write {final} ({getattr(exc, 'strerror', None) or exc}); the final checkpoint "
                           f"{last} is intact: free disk space and run python -m forge_rt.train --resume {run} "
                           "to write it") from None
