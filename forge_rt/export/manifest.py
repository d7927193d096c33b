"""The small JSON written next to every export: what it came from and what it is."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from forge_rt.core.atomic import write_atomic


def sha256(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def build(kind: str, out: Path, src, quant: str | None, dtype: str | None, seconds: float, **extra) -> dict:
    from forge_rt import __version__
    return {
        "kind": kind,
        "output": str(out),
        "bytes": size(out),
        "sha256": None if out.is_dir() else sha256(out),
        "quant": quant,
        "dtype": dtype,
        "source_run": None if src.run is None else str(src.run),
        "adapter": str(src.adapter),
        "adapter_sealed": src.sealed,
        "base": str(src.model),
        "base_sha256": sha256(src.model) if src.model.is_file() else None,
        "base_bytes": size(src.model),
        "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "forge_rt": __version__,
        **extra,
    }


def write(record: dict, out: Path) -> Path:
    return write_atomic(manifest_path(out), json.dumps(record, indent=2) + "\n")
