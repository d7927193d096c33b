"""gguf's own GGUFReader, with its fields parsed over a plain ndarray view of the file's memory map.

Why: the stock reader slices an np.memmap once per field part (three per vocabulary string), and each slice
builds a memmap object; SmolLM2's 49k vocabulary is ~1M parts. Over a plain view of the same read-only map
the parse is ~3.7x faster (SmolLM2 Q4_1 2.58 -> 0.67 s, Gemma 3 270M with 262k tokens 10.78 -> 3.05 s: medians
in bench/results/gguf_parse.json; fields and tensor bytes equal: tests/models/test_gguf_reader.py). Upstream
knows (llama.cpp PR 13378, open).

transformers' GGUF loading (config, tokenizer, weights) looks `gguf.GGUFReader` up when it is called, several
times per model; `fast_gguf()` hands it this reader for the duration of a forge_rt load. Within it, also
`gguf.get_tensor_name_map` is memoised: transformers' weights map builds a fresh TensorNameMap (the name table
of every architecture, ~14 ms) for each of a model's modules: SmolLM2's weights map 5.49 s -> 8 ms."""
from __future__ import annotations

import contextlib
import functools
import threading

import gguf
import numpy as np

_stock_name_map = gguf.get_tensor_name_map
_swap = threading.RLock()  # re-entrant: a model load nests the tokenizer load


class GGUFReader(gguf.GGUFReader):
    """gguf.GGUFReader (read-only use), parsing 4x faster; tensor data are plain ndarray views of the map."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self.mapped = mapped  # the np.memmap itself (its ._mmap gives pages back: madvise)
        self._plain = mapped.view(np.ndarray)  # the same pages, without np.memmap's per-slice bookkeeping


@functools.lru_cache(maxsize=16)
def tensor_name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    """gguf.get_tensor_name_map, once per architecture and depth (callers only look names up in it)."""
    return _stock_name_map(arch, n_blocks)


@contextlib.contextmanager
def fast_gguf():
    """Within the block, `gguf.GGUFReader` and `gguf.get_tensor_name_map` (what transformers calls) are this
    module's."""
    with _swap:
        stock = gguf.GGUFReader, gguf.get_tensor_name_map
        gguf.GGUFReader, gguf.get_tensor_name_map = GGUFReader, tensor_name_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = stock
