"""Writing a GGUF one tensor at a time: every tensor's name, shape and stored type go into the header first
(GGUFWriter.add_tensor_info), then each tensor is computed, encoded, written (write_tensor_data) and dropped
before the next, so the writer holds one tensor, never the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from .source import ExportError

_FLOAT = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


@dataclass
class Planned:
    name: str
    shape: tuple                      # torch / numpy order, rows along the last axis
    ttype: gguf.GGMLQuantizationType  # the type it is stored as
    produce: Callable[[], np.ndarray]  # its encoded data, as GGUFWriter.add_tensor would take it


def _add_info(writer: gguf.GGUFWriter, t: Planned) -> int:
    if t.ttype in _FLOAT:
        dtype = np.dtype(_FLOAT[t.ttype])
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
        writer.add_tensor_info(t.name, t.shape, dtype, nbytes)
        return nbytes
    byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, t.ttype)
    nbytes = int(np.prod(byte_shape, dtype=np.int64))
    writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t.ttype)
    return nbytes


def write_streamed(writer: gguf.GGUFWriter, plan: list[Planned]) -> None:
    """Header, key/values and tensor infos of `plan`, then each tensor's data in plan order; closes the file."""
    sizes = [_add_info(writer, t) for t in plan]
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, nbytes in zip(plan, sizes):
            data = t.produce()
            if data.nbytes != nbytes:  # the header already promised this size
                raise ExportError(f"{t.name}: encoded to {data.nbytes} bytes, the header says {nbytes} ({t.ttype.name})")
            writer.write_tensor_data(data)
            del data
    finally:
        writer.close()
