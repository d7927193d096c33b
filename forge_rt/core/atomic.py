"""Outputs appear whole or not at all: written under a temporary name next to the target, fsynced, renamed
at the end, removed on any failure (a full disk included). The one place forge_rt writes atomically."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def check_target(out: Path, overwrite: bool) -> None:
    """Called before any long work."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} does not exist; create it or choose another --out")


@contextlib.contextmanager
def atomic_path(out: Path, overwrite: bool):
    """Yields a temporary sibling path (file or directory, the caller decides) that becomes `out` on success."""
    check_target(out, overwrite)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if out.exists():  # --overwrite: the old output goes only once the new one is complete
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def fsync_path(path: Path) -> None:
    """Flushes a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Writes `data` to `path` whole or not at all: a temporary sibling, fsynced, renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
