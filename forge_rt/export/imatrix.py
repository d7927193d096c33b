"""Importance matrices in llama.cpp's legacy `imatrix.dat` layout (what `llama-imatrix --output-format dat`
writes and `llama-quantize --imatrix` reads), so one collected here can be reused with llama.cpp's tools.

Layout, little-endian: int32 entry count; per entry (sorted by name): int32 name length, the name (a GGUF
tensor name, e.g. blk.0.attn_q.weight), int32 ncall, int32 value count, float32 values; then int32 chunk
count and int32 length + the dataset's name. A value is the column's mean squared activation times
ncall (llama-quantize divides by ncall again)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .source import ExportError


class ImatrixError(ExportError):
    pass


def write_imatrix_dat(path, entries: dict, ncall: int = 1, chunks: int = 1, dataset: str = "") -> None:
    """`entries`: GGUF tensor name -> per-input-column mean of squared activations (1-D)."""
    if ncall < 1:
        raise ImatrixError(f"imatrix ncall must be >= 1, got {ncall}")
    parts = [struct.pack("<i", len(entries))]
    for name in sorted(entries):
        values = np.asarray(entries[name], dtype=np.float32)
        if values.ndim != 1 or not np.isfinite(values).all():
            raise ImatrixError(f"imatrix entry {name}: need a finite 1-D vector, got shape {values.shape}")
        raw = name.encode()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size),
                  (values * np.float32(ncall)).astype("<f4").tobytes()]
    ds = dataset.encode()
    parts += [struct.pack("<i", chunks), struct.pack("<i", len(ds)), ds]
    Path(path).write_bytes(b"".join(parts))


def read_imatrix_dat(path) -> dict:
    """GGUF tensor name -> per-column mean squared activation (float32), as llama-quantize reads the file."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise ImatrixError(f"cannot read imatrix {path}: {exc.strerror or exc}") from None
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise ImatrixError(f"{path} is not a llama.cpp imatrix.dat file (truncated at byte {pos}); "
                               "write it with llama-imatrix --output-format dat or forge_rt")
        out = struct.unpack_from(fmt, buf, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 0 or n > len(buf):
        raise ImatrixError(f"{path} is not a llama.cpp imatrix.dat file (entry count {n})")
    entries = {}
    for _ in range(n):
        (length,) = take("<i")
        if length <= 0 or length > 4096:
            raise ImatrixError(f"{path} is not a llama.cpp imatrix.dat file (name length {length} at byte {pos - 4})")
        name = take(f"<{length}s")[0].decode(errors="replace")
        ncall, nval = take("<ii")
        if nval < 0:
            raise ImatrixError(f"{path}: entry {name} has {nval} values")
        values = np.frombuffer(take(f"<{4 * nval}s")[0], dtype="<f4").astype(np.float32)
        entries[name] = values / np.float32(ncall) if ncall > 0 else values
    return entries


def weights_for(imatrix: dict | None, name: str, ncols: int) -> np.ndarray | None:
    """The importance weights of GGUF tensor `name`, checked against its row length (None: none given)."""
    if imatrix is None or name not in imatrix:
        return None
    w = np.asarray(imatrix[name], dtype=np.float32)
    if w.shape != (ncols,):
        raise ImatrixError(f"imatrix entry {name} has {w.size} values but the tensor's rows have {ncols}: "
                           "the imatrix was collected on another model; collect it on this one")
    return w


def check_imatrix(imatrix: dict, row_lengths) -> None:
    """Before any long work: every entry's length must be a row length of this model."""
    rows = {int(n) for n in row_lengths}
    for name, values in imatrix.items():
        if np.asarray(values).size not in rows:
            raise ImatrixError(f"imatrix entry {name} has {np.asarray(values).size} values, no row length of this "
                               f"model ({', '.join(map(str, sorted(rows)))}): the imatrix was collected on another "
                               "model; collect it on this one")
