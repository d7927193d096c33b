"""Dataset retention: overwrite, fsync and unlink training files after a run.

Caveat (also stated in every record): on SSDs (wear levelling, over-provisioning), copy-on-write or
journaling filesystems (btrfs, ZFS, APFS, data=journal ext4), snapshots and backups, overwriting a file
in place does not guarantee the old blocks are gone. Use full-disk encryption and discard the key
for that guarantee; shredding only removes the ordinary, easily recovered copies.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

CAVEAT = ("overwrite-in-place is best effort: SSDs, copy-on-write/journaling filesystems, snapshots and "
          "backups may keep copies of the old data; only full-disk encryption with a discarded key guarantees erasure")
_CHUNK = 1 << 20


def shred_file(path, passes: int = 1) -> dict:
    """Overwrite `path` with random bytes `passes` times (fsync after each), then unlink it."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise FileNotFoundError(f"{path}: not a regular file; shred refuses symlinks, directories and missing paths")
    size = path.stat().st_size
    with open(path, "r+b", buffering=0) as f:
        for _ in range(passes):
            f.seek(0)
            left = size
            while left:
                n = min(left, _CHUNK)
                f.write(os.urandom(n))
                left -= n
            os.fsync(f.fileno())
    path.unlink()
    return {"path": str(path), "bytes": size, "passes": passes}


def shred_paths(paths, passes: int = 1) -> dict:
    """Shred files, and every file under directories (then remove the emptied directories).
    Returns a record for the run report."""
    files, dirs = [], []
    for p in map(Path, paths):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise FileNotFoundError(f"{p}: not a regular file or directory (missing or a symlink); nothing was shredded")
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink())
            dirs += sorted((q for q in p.rglob("*") if q.is_dir()), key=lambda q: -len(q.parts)) + [p]
        else:
            files.append(p)
    done = [shred_file(f, passes) for f in files]
    for d in dirs:
        for link in d.iterdir():   # symlinks are unlinked, never followed
            link.unlink()
        d.rmdir()
    return {"shredded": done, "files": len(done), "bytes": sum(r["bytes"] for r in done), "passes": passes,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "caveat": CAVEAT}


__all__ = ["shred_file", "shred_paths", "CAVEAT"]
