"""Crash-safe training checkpoints.

A checkpoint is a directory `step-NNNNNNNN/` under the run's `checkpoints/`: trainable (LoRA) weights,
optimizer and scheduler state, RNG states and the position in the data order. It is written into a
temporary directory, fsynced, then renamed into place; older checkpoints are deleted only after that,
so a crash or a full disk mid-write leaves the previous checkpoint whole. The newest two are kept, so a
newest one that turns out unreadable falls back to the one before (`load_latest`)."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from forge_rt.core.atomic import fsync_path
from forge_rt.core.errors import ForgeError

_NAME = re.compile(r"step-(\d{8})")
_TMP = re.compile(r"\.tmp-step-\d{8}-\d+")
KEEP = 2


class CheckpointError(ForgeError, RuntimeError):
    pass


# Each file streams straight to disk: serializing in memory first held 1.5-2x the optimizer state and the
# weights on top of training's peak (the 7B-shaped run's peak was its checkpoint). A failed write (full
# disk: ENOSPC/EFBIG) still surfaces as OSError, whatever the library made of it.

def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    fsync_path(path)


def _write_torch(path: Path, obj) -> None:
    with open(path, "wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as exc:  # torch's zip writer reports the file object's OSError as its own error
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise
    fsync_path(path)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        save_file(tensors, path)
    except SafetensorError as exc:  # "... I/O error: No space left on device (os error 28)"
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
    fsync_path(path)


def capture_rng() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict,
                    scheduler: dict, data_state: dict, keep: int = KEEP) -> Path:
    """Writes checkpoint `step` atomically and then prunes to the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        rng = capture_rng()
        _write_safetensors(tmp / "weights.safetensors", {k: v.detach().contiguous() for k, v in weights.items()})
        _write_torch(tmp / "state.pt", {"optimizer": optimizer, "scheduler": scheduler, "torch_rng": rng["torch"]})
        _write_bytes(tmp / "progress.json", json.dumps(
            {"step": step, "data": data_state, "python_rng": _py_rng_to_json(rng["python"])}).encode())
        fsync_path(tmp)
        if final.exists():  # re-checkpointing the same step (e.g. interrupt right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(root)
        kept = (f"the previous checkpoint {prev} is intact: free disk space and continue with --resume "
                f"{root.parent}") if prev else "there is no earlier checkpoint to resume from: free disk space and start again"
        raise CheckpointError(f"could not write checkpoint for step {step} in {root}: {exc.strerror or exc} "
                              f"(errno {exc.errno}); {kept}") from exc
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _py_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def latest_checkpoint(root: Path) -> Path | None:
    found = _checkpoints(root)
    return found[-1] if found else None


def clean_partial(root: Path) -> list[str]:
    """Removes half-written temporary checkpoints (a crash or kill mid-write); returns their names."""
    found = [p for p in root.iterdir() if _TMP.fullmatch(p.name)] if root.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in found]


def load_latest(root: Path) -> tuple[Path, dict]:
    """The newest readable checkpoint under `root` and its state; an unreadable newer one is skipped with
    a warning (it stays on disk for inspection)."""
    found = _checkpoints(root)
    if not found:
        raise CheckpointError(f"no checkpoint in {root}; start a new run instead")
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            print(f"warning: {exc}; trying the previous checkpoint", file=sys.stderr, flush=True)
    raise CheckpointError(f"no readable checkpoint in {root} (tried {', '.join(p.name for p in found)}); "
                          "start a new run")


def load_checkpoint(path: Path) -> dict:
    """{'step', 'data', 'weights', 'optimizer', 'scheduler', 'rng'} of a checkpoint directory."""
    try:
        progress = json.loads((path / "progress.json").read_text())
        state = torch.load(path / "state.pt", weights_only=True)
        weights = load_file(path / "weights.safetensors")
        version, internal, gauss = progress["python_rng"]
        return {"step": progress["step"], "data": progress["data"], "weights": weights,
                "optimizer": state["optimizer"], "scheduler": state["scheduler"],
                "rng": {"torch": state["torch_rng"], "python": (version, tuple(internal), gauss)}}
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
