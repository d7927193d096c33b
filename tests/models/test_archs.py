"""Qwen 3 (q/k norms), Llama 3.x (llama3 rope scaling, tied head) and Gemma 3 text (sliding-window layers,
+1 RMSNorm, embedding scale) end to end with tiny random models: a GGUF of each loads as the HF model it was
written from, runs in llama.cpp like PyTorch, goes through gguf-base with every tensor and metadata key as
the source file's, trains from the GGUF with every linear fused, and its gguf-base + gguf-lora export
runs in llama.cpp like the trained PyTorch model; stock PEFT loads the adapter. (HF-directory streaming and
training of these architectures: tests/train/test_stream_load.py, parametrized over TINY_ARCHS.)"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from arch_models import assert_llamacpp_matches, llamacpp_steps, write_source_gguf
from forge_rt.models import load_model
from forge_rt.testing import make_tiny_model_dir, rel_err

ARCHS = ("qwen3", "llama3", "gemma3_text")


@pytest.fixture(scope="module", params=ARCHS)
def files(request, small_tok, tmp_path_factory):
    """(arch, HF directory in shards, GGUF written from it at f32, the same at q8_0)."""
    root = tmp_path_factory.mktemp(request.param)
    d = make_tiny_model_dir(root / "hf", small_tok, request.param, max_shard_size="200KB")
    return (request.param, d, write_source_gguf(d, small_tok, root / "f32.gguf"),
            write_source_gguf(d, small_tok, root / "q8_0.gguf", "q8_0"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_gguf_loads_as_the_hf_model(files):
    """Exactly, also streamed into NF4: the norms' +1 and the rope scaling survive the file."""
    _, d, f32, _ = files
    ids = torch.randint(0, 1000, (2, 24))  # longer than Gemma's sliding window (8)
    hf, gg = load_model(d)[0], load_model(f32)[0]
    assert rel_err(_logits(gg, ids), _logits(hf, ids)) < 1e-6
    a, b = load_model(f32, nf4=True)[0].state_dict(), load_model(d, nf4=True)[0].state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def _roundtrip(src, out, quant, tok):
    from forge_rt.export.gguf_model import write_gguf
    model, _ = load_model(src)
    write_gguf(model, tok, out, quant, src)
    return gguf.GGUFReader(src), gguf.GGUFReader(out)


def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_gguf_base_round_trip_keeps_every_tensor_and_key(files, small_tok, tmp_path):
    """f32 -> f32 and q8_0 -> q8_0: every tensor bit-equal (same type, shape, bytes), every key equal."""
    for src in files[2:]:
        a, b = _roundtrip(src, tmp_path / f"rt.{src.name}", "q8_0" if "q8_0" in src.name else "f32", small_tok)
        assert _fields(a) == _fields(b)
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for s, t in zip(a.tensors, b.tensors):
            assert (s.tensor_type, s.shape.tolist()) == (t.tensor_type, t.shape.tolist()), s.name
            assert np.array_equal(s.data.view(np.uint8), t.data.view(np.uint8)), s.name


def test_gguf_base_at_f16_is_within_its_rounding(files, small_tok, tmp_path):
    a, b = _roundtrip(files[3], tmp_path / "rt16.gguf", "f16", small_tok)
    for s, t in zip(a.tensors, b.tensors):
        want = gguf.dequantize(s.data, s.tensor_type)
        got = gguf.dequantize(t.data, t.tensor_type)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:  # vectors (norms) keep their type: bit-equal
            assert np.array_equal(want, got), s.name
        else:
            np.testing.assert_allclose(got, want, rtol=2.0 ** -11, atol=2.0 ** -24, err_msg=s.name)


@pytest.mark.slow
def test_source_and_round_trip_run_in_llamacpp_like_pytorch(files, small_tok, tmp_path):
    _, d, f32, _ = files
    assert_llamacpp_matches(load_model(d)[0], f32, small_tok)
    _roundtrip(f32, tmp_path / "rt.gguf", "f32", small_tok)
    ids = small_tok("Say hello.").input_ids
    assert llamacpp_steps(tmp_path / "rt.gguf", ids, 8) == llamacpp_steps(f32, ids, 8)


@pytest.fixture(scope="module")
def trained(files, small_tok, tmp_path_factory):
    """A fused run trained from the f32 GGUF (2 steps), exported as gguf-base + gguf-lora at f32."""
    from forge_rt.cli import train
    from forge_rt.export import export_run
    from forge_rt.testing import tiny_args, tiny_rows, write_jsonl
    root = tmp_path_factory.mktemp(f"run_{files[0]}")
    data = write_jsonl(root / "train.jsonl", tiny_rows(8))
    assert train.main(tiny_args(files[2], data, root / "run", "--max-steps", "2", "--checkpoint-every", "2",
                                "--max-len", "160")) == 0
    export_run(root / "run", {"gguf-base": root / "base.gguf", "gguf-lora": root / "lora.gguf"}, quant="f32")
    return root


@pytest.mark.slow
def test_trained_from_gguf_fused_and_its_export_runs_in_llamacpp(files, trained, small_tok):
    from peft import PeftModel
    from forge_rt.models import load_run
    from forge_rt.nn import NF4Linear, quantize_model
    summary = json.loads((trained / "run" / "metrics.json").read_text())["fused_summary"]
    assert summary["skipped"] == {} and summary["accelerated"] == 14  # 7 linears x 2 layers, none stock
    ours, tok, _ = load_run(trained / "run")
    head = ours.get_base_model().get_output_embeddings()
    linears = [m for n, m in ours.get_base_model().named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head and ".lora_" not in n]  # LoRA A/B are plain
    assert linears and all(isinstance(m, NF4Linear) for m in linears)
    assert_llamacpp_matches(ours, trained / "base.gguf", tok, lora=trained / "lora.gguf")
    stock = PeftModel.from_pretrained(quantize_model(load_model(files[2])[0]), trained / "run" / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 16))
    assert rel_err(_logits(ours, ids), _logits(stock, ids)) < 1e-4
