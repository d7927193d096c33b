"""llama.cpp's legacy imatrix.dat layout (tools/imatrix: save_imatrix_legacy; tools/quantize reads it and
divides each value by ncall), and the export's refusals of an imatrix that does not fit."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from forge_rt.export.imatrix import ImatrixError, read_imatrix_dat, weights_for, write_imatrix_dat


def _llama_cpp_bytes(entries: dict, ncall: int, chunks: int, dataset: bytes) -> bytes:
    """The layout spelled out field by field, as llama-imatrix writes it (values stored times ncall)."""
    out = struct.pack("<i", len(entries))
    for name in sorted(entries):
        v = np.asarray(entries[name], "<f4")
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size) + (v * ncall).tobytes()
    return out + struct.pack("<ii", chunks, len(dataset)) + dataset


def test_layout_and_round_trip(tmp_path):
    entries = {"blk.1.ffn_down.weight": np.array([0.5, 2.0, 0.0], np.float32),
               "blk.0.attn_q.weight": np.array([1.0, 0.25], np.float32)}
    p = tmp_path / "i.dat"
    write_imatrix_dat(p, entries, ncall=8, chunks=8, dataset="train.jsonl")
    assert p.read_bytes() == _llama_cpp_bytes(entries, 8, 8, b"train.jsonl")
    back = read_imatrix_dat(p)
    assert list(back) == sorted(entries)
    for k, v in entries.items():
        np.testing.assert_array_equal(back[k], v)


def test_reads_a_file_llama_imatrix_wrote(tmp_path):
    """Values are mean squares times ncall; the reader divides as llama-quantize does."""
    p = tmp_path / "l.dat"
    p.write_bytes(_llama_cpp_bytes({"blk.0.attn_v.weight": np.array([3.0, 6.0], np.float32)}, 3, 12, b"wiki.txt"))
    np.testing.assert_allclose(read_imatrix_dat(p)["blk.0.attn_v.weight"], [3.0, 6.0], rtol=1e-6)


@pytest.mark.parametrize("cut", [2, 9, 30])
def test_truncated_file_is_one_clear_error(tmp_path, cut):
    p = tmp_path / "t.dat"
    write_imatrix_dat(p, {"blk.0.attn_q.weight": np.ones(4, np.float32)})
    p.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(ImatrixError, match="not a llama.cpp imatrix.dat file"):
        read_imatrix_dat(p)


def test_entry_of_another_model_is_refused():
    with pytest.raises(ImatrixError, match="collected on another model"):
        weights_for({"blk.0.attn_q.weight": np.ones(576, np.float32)}, "blk.0.attn_q.weight", 256)
    assert weights_for({}, "blk.0.attn_q.weight", 256) is None


def test_export_refuses_a_mismatched_imatrix_before_loading(tiny_run, tmp_path, capsys, monkeypatch):
    from forge_rt.export import api
    from forge_rt.export.__main__ import main
    imat = tmp_path / "i.dat"
    write_imatrix_dat(imat, {"blk.0.attn_q.weight": np.ones(576, np.float32)})  # SmolLM2's width, not the tiny model's
    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded the model before the check"))
    capsys.readouterr()
    for extra, want in ((["--quant", "q4_k_m"], "collected on another model"), (["--quant", "f16"], "--imatrix weights")):
        assert main([str(tiny_run), "--to", "gguf", "--out", str(tmp_path / "o.gguf"), "--imatrix", str(imat), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and want in err[0], err
