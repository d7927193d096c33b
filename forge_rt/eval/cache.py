"""What evaluation can reuse between runs, under $FORGE_RT_CACHE (default ~/.cache/forge_rt):

- `base-scores/<key>.json`: the base model's held-out result. It depends only on the model, the held-out
  rows, how they are rendered (prompt format, chat template), the generation length, the engine and the
  retention text, so the key is a digest of exactly those; change any of them and the entry is not found.
- `gguf-base/<key>.gguf`: the base as trained, exported for llama.cpp (deterministic per base model file
  and export settings).
Digests of large model files are remembered by (path, size, mtime) so a second run does not re-read them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from forge_rt.core.atomic import atomic_path, write_atomic

FORMAT = 1  # bump when what a cached entry means changes


def cache_root() -> Path:
    return Path(os.environ.get("FORGE_RT_CACHE", Path.home() / ".cache" / "forge_rt"))


def digest_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(path) -> str:
    """sha256 of a model file, or of a model directory's weight and config files (names and contents)."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and f.suffix in
                                           (".safetensors", ".bin", ".json", ".gguf", ".model", ".txt"))
    memo_path = cache_root() / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    parts, changed = [], False
    for f in files:
        st = f.stat()
        stamp = f"{f}:{st.st_size}:{st.st_mtime_ns}"
        if stamp not in memo:
            memo[stamp], changed = _file_sha256(f), True
        parts.append((f.name if p.is_dir() else "", memo[stamp]))
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_path, json.dumps(memo))
    return digest_json(parts)


def examples_digest(examples) -> str:
    """The held-out rows as evaluated (after scrubbing and --eval-limit)."""
    return digest_json([ex["messages"] for ex in examples])


class BaseScoreCache:
    """The base model's evaluation result, keyed by a dict of everything it depends on."""

    def __init__(self, key: dict, root: Path | None = None):
        self.key = {"format": FORMAT, **key}
        self.path = (root or cache_root()) / "base-scores" / f"{digest_json(self.key)}.json"

    def get(self) -> dict | None:
        try:
            entry = json.loads(self.path.read_text())
        except (OSError, ValueError):  # absent, or damaged: evaluate again
            return None
        if entry.get("key") != self.key:
            return None
        return {**entry["result"], "cached": True, "cached_from": str(self.path)}

    def put(self, result: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"key": self.key, "result": result}, default=str))


def cached_file(kind: str, key: dict, suffix: str, produce, root: Path | None = None) -> tuple[Path, bool]:
    """(path, was_cached): `<root>/<kind>/<digest of key><suffix>`, made by `produce(tmp_path)` (atomically)
    when absent."""
    out = (root or cache_root()) / kind / f"{digest_json({'format': FORMAT, **key})}{suffix}"
    if out.is_file():
        return out, True
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=True) as tmp:
        produce(tmp)
    write_atomic(out.with_suffix(".key.json"), json.dumps(key, sort_keys=True, default=str))
    return out, False
