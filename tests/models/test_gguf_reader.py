"""The fast GGUF reader (models.gguf_reader) parses exactly what gguf's own reader parses, and forge_rt's loads
hand it to transformers only for their duration."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from forge_rt.models import default_gguf_path, gguf_reader
from forge_rt.models.gguf_reader import GGUFReader, fast_gguf


def _written(path):
    """A GGUF written by gguf's own writer: every scalar kind, string and number arrays (a 5000-entry vocabulary),
    tensors in F32, F16 and Q8_0 (quantized by gguf)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.name", "reader check")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_token_list([f"tok{i}" * (1 + i % 3) for i in range(5000)])
    w.add_token_scores(rng.random(5000).astype(np.float32).tolist())
    w.add_array("tokenizer.ggml.token_type", [1 + i % 5 for i in range(5000)])
    w.add_tensor("a.weight", rng.standard_normal((8, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((4, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((6, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_fields_and_tensors_equal_the_stock_readers(tmp_path):
    path = _written(tmp_path / "w.gguf")
    stock, fast = gguf.GGUFReader(path), GGUFReader(path)
    assert list(fast.fields) == list(stock.fields) and len(fast.fields["tokenizer.ggml.tokens"].data) == 5000
    for key, field in stock.fields.items():
        assert fast.fields[key].types == field.types and fast.fields[key].contents() == field.contents(), key
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in fast.tensors] == \
           [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in stock.tensors]
    for a, b in zip(fast.tensors, stock.tensors):
        assert type(a.data) is np.ndarray and not a.data.flags.writeable
        np.testing.assert_array_equal(a.data, b.data)


def test_the_swap_is_scoped_and_undone_on_error():
    stock = gguf.GGUFReader
    with pytest.raises(RuntimeError):
        with fast_gguf():
            assert gguf.GGUFReader is GGUFReader
            with fast_gguf():  # a model load nests its tokenizer load
                assert gguf.GGUFReader is GGUFReader
            assert gguf.GGUFReader is GGUFReader
            raise RuntimeError
    assert gguf.GGUFReader is stock


def test_transformers_gets_the_fast_reader_inside_forge_rt_loads(monkeypatch):
    from forge_rt.models import paths
    made = []

    class Counting(GGUFReader):
        def __init__(self, *a, **kw):
            made.append(a[0])
            super().__init__(*a, **kw)
    monkeypatch.setattr(gguf_reader, "GGUFReader", Counting)
    paths._gguf_config.cache_clear()
    paths.model_config(default_gguf_path())  # transformers' AutoConfig over the GGUF
    assert made and gguf.GGUFReader is not Counting



def test_a_streaming_load_still_gives_the_mapped_pages_back(monkeypatch):
    """stream_load hands the map's touched pages back every _DROP_EVERY bytes, through the reader's np.memmap."""
    import torch
    from forge_rt.models import stream_load
    from forge_rt.models.paths import model_config
    path = default_gguf_path()
    monkeypatch.setattr(stream_load, "_DROP_EVERY", 0)  # a madvise after every tensor
    tensors = stream_load.gguf_tensors(path, stream_load.skeleton(model_config(path), torch.float32))
    for _, (name, _, n_bytes, read) in zip(range(3), tensors):
        assert name is not None and read().numel() * 4 >= n_bytes
