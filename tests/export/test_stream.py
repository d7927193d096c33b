"""The GGUF export streams: one LoRA layer folded at a time, and gguf-lora reads no base weight."""
from __future__ import annotations

import gc
import importlib
import shutil
import weakref

import gguf
import pytest

from forge_rt.export import export_run
from forge_rt.models import ModelLoadError, load_model
from forge_rt.models.gguf_reader import GGUFReader  # gguf's reader, parsing 4x faster

merge_mod = importlib.import_module("forge_rt.export.merge")  # the package exports a function of that name
gguf_model = importlib.import_module("forge_rt.export.gguf_model")


def test_gguf_lora_reads_no_base_weight(tiny_run, tiny_model, tmp_path):
    """Over a base whose weights file is garbage (loading it fails), gguf-lora writes the same bytes as
    over the real base: it used the base's shapes only."""
    ref = tmp_path / "ref.gguf"
    export_run(tiny_run, {"gguf-lora": ref, "gguf-base": tmp_path / "b.gguf"})  # this one loads the weights
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.startswith("model.safetensors") and f.suffix != ".safetensors":
            shutil.copy(f, shapes / f.name)
    (shapes / "model.safetensors").write_bytes(b"\x08" + b"\0" * 63)  # any weight read fails
    with pytest.raises(ModelLoadError):
        load_model(shapes)
    out = tmp_path / "a.gguf"
    export_run(adapter=tiny_run / "adapter", model=shapes, targets={"gguf-lora": out})
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("kind", ["gguf", "gguf-base"])
def test_one_layer_folded_at_a_time(kind, tiny_run, tmp_path, monkeypatch):
    """Every merged (or decoded) fp32 weight, and every tensor's encoded bytes, is freed before the next
    layer is merged, and the file holds them all."""
    alive, made = [], []
    real, real_encode = merge_mod._merged_weight, gguf_model.encode

    def tracked(layer, adapters=True):
        gc.collect()
        still = [r for r in alive if r() is not None]
        assert not still, f"{len(still)} merged weights or encoded tensors still held when the next is merged"
        w = real(layer, adapters)
        alive.append(weakref.ref(w))
        made.append(tuple(w.shape))
        return w

    def encode(*a, **k):
        data, raw = real_encode(*a, **k)
        alive.append(weakref.ref(data))
        return data, raw

    monkeypatch.setattr(merge_mod, "_merged_weight", tracked)
    monkeypatch.setattr(gguf_model, "encode", encode)
    out = tmp_path / "m.gguf"
    export_run(tiny_run, {kind: out}, quant="q8_0")
    assert len(made) == 14  # 2 layers x 7 LoRA targets
    reader = GGUFReader(out)
    assert sum(t.name.startswith("blk.") and t.tensor_type == gguf.GGMLQuantizationType.Q8_0
               for t in reader.tensors) == 14
