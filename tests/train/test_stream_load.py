"""Streaming NF4 load (forge_rt.models.stream_load): every supported architecture, from sharded safetensors
and from GGUF, gives the same NF4 bytes and logits as loading in fp32 then quantize_model, trains through
the trainer with every linear fused, and bad checkpoints fail before training, naming file and tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from forge_rt.cli import train
from forge_rt.nn import NF4Linear, quantize_model
from forge_rt.testing import TINY_ARCHS, make_tiny_model_dir, rel_err, tiny_args, tiny_rows, write_jsonl
from forge_rt.models import ModelLoadError, load_model, load_run


@pytest.fixture(scope="module")
def arch_dirs(small_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    # Shards of at most 2 MB: each tiny model spans several files and an index.
    return {a: make_tiny_model_dir(root / a, small_tok, a, max_shard_size="200KB") for a in TINY_ARCHS}


def _assert_same_model(streamed, reference):
    ref = quantize_model(reference)
    a, b = streamed.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for (name, m), (_, r) in zip(streamed.named_modules(), ref.named_modules()):
        if isinstance(m, NF4Linear):  # absmax and double-quantization state, not only the packed bytes
            assert torch.equal(m.nf4.absmax, r.nf4.absmax), name
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_sharded_safetensors_stream_to_the_same_nf4(arch_dirs, arch):
    d = arch_dirs[arch]
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 1
    streamed, _ = load_model(d, nf4=True)
    head = streamed.get_output_embeddings()
    linears = [m for m in streamed.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert linears and all(isinstance(m, NF4Linear) for m in linears)
    if streamed.config.tie_word_embeddings:
        assert head.weight is streamed.get_input_embeddings().weight
    _assert_same_model(streamed, load_model(d)[0])


@pytest.mark.parametrize("arch,quant", [("llama", "f32"), ("llama", "q8_0"), ("qwen2", "f32")])
def test_gguf_streams_to_the_same_nf4_as_transformers_gguf_load(arch_dirs, small_tok, tmp_path, arch, quant):
    from transformers import AutoModelForCausalLM
    from forge_rt.export.gguf_model import write_gguf
    out = tmp_path / f"{arch}.{quant}.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(arch_dirs[arch]), small_tok, out, quant, None)
    streamed, _ = load_model(out, nf4=True)
    _assert_same_model(streamed, load_model(out)[0])  # transformers un-permutes llama.cpp's q/k rows itself
    if quant == "f32":  # lossless: the same NF4 as the safetensors it came from
        _assert_same_model(load_model(out, nf4=True)[0], load_model(arch_dirs[arch])[0])


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_trains_fused_and_stock_peft_loads_the_adapter(arch_dirs, arch, tmp_path, capsys):
    from peft import PeftModel
    data = write_jsonl(tmp_path / "train.jsonl", tiny_rows(8))
    run = tmp_path / "run"
    assert train.main(tiny_args(arch_dirs[arch], data, run, "--max-steps", "2", "--checkpoint-every", "2",
                                "--max-len", "160")) == 0
    assert "stock path: none" in capsys.readouterr().out
    ours, _, _ = load_run(run)
    stock = PeftModel.from_pretrained(quantize_model(load_model(arch_dirs[arch])[0]), run / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, stock(ids).logits) < 1e-4


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _fails_before_training(model_dir, tmp_path, capsys, *needles):
    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "t.jsonl", tiny_rows(8))
    assert train.main(tiny_args(model_dir, data, run, "--max-len", "160")) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, (n, err)
    assert not (run / "metrics.jsonl").exists()


def test_truncated_shard(arch_dirs, tmp_path, capsys):
    d = _copy(arch_dirs["llama"], tmp_path / "cut")
    shard = sorted(d.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails_before_training(d, tmp_path, capsys, str(shard), "is truncated: tensor ", "copy the shard again")


def test_shard_missing_a_tensor(arch_dirs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    d = _copy(arch_dirs["qwen2"], tmp_path / "holed")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.k_proj.bias"
    shard = d / index[name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    _fails_before_training(d, tmp_path, capsys, str(shard), f"lacks tensor {name}")


def test_checkpoint_without_a_tensor_anywhere(arch_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(arch_dirs["llama"], tmp_path / "short")
    tensors = {}
    for f in d.glob("*.safetensors"):
        tensors.update(load_file(f))
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="does not hold 1 tensor.*model.layers.0.mlp.up_proj.weight"):
        load_model(d, nf4=True)


def test_non_causal_config(small_tok, tmp_path, capsys):
    from transformers import BertConfig, BertModel
    d = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=len(small_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(d)
    small_tok.save_pretrained(d)
    _fails_before_training(d, tmp_path, capsys, str(d), "not a causal language model")


def test_unsupported_architecture_says_so(small_tok, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    d = tmp_path / "neox"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_neox", vocab_size=len(small_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(d)
    small_tok.save_pretrained(d)
    with pytest.raises(ModelLoadError, match="'gpt_neox' has no streaming NF4 loader.*--no-fused"):
        load_model(d, nf4=True)


# In a fresh process: warm up on a tiny model (imports, the skeleton's code), then the peak RSS of each load over
# the RSS before it, the kernel's high-water mark reset through /proc/self/clear_refs ("5").
PEAK_RSS = """
import gc, json, sys
from forge_rt.models import load_model, load_tokenizer
from forge_rt.nn import NF4Linear, quantize_model

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

def growth(load):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    model = load()
    return status("VmHWM") - before, sum(isinstance(m, NF4Linear) for m in model.modules())

big, tiny = sys.argv[1], sys.argv[2]
tok = load_tokenizer(big)
growth(lambda: load_model(tiny, nf4=True)[0])
streamed, n = growth(lambda: load_model(big, nf4=True, tokenizer=tok)[0])
full, _ = growth(lambda: quantize_model(load_model(big, tokenizer=tok)[0]))
print(json.dumps({"streamed": streamed, "full": full, "nf4_linears": n}))
"""


def test_the_load_streams_a_7b_tool_checkpoint(arch_dirs, small_tok, tmp_path):
    """A bf16 checkpoint written by tools/make_7b_checkpoint.py (6 layers of 512 x 2048: 100 MB in fp32) loads
    into NF4 with a peak of less than 0.75x its fp32 size over the RSS before (measured 0.24-0.27x), where loading
    fp32 then quantizing (the oracle: the measurement sees it) takes more than the fp32 size (measured 1.5x)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs to reset the RSS high-water mark (Linux only)")
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("make_7b_checkpoint", root / "tools" / "make_7b_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hidden, inter, layers = 512, 2048, 6
    d = mod.write_checkpoint(tmp_path / "m", hidden, inter, layers, 8, 256, 16 << 20, small_tok)
    assert len(list(d.glob("*.safetensors"))) > 1
    fp32 = 4 * layers * (4 * hidden * hidden + 3 * hidden * inter)
    # glibc's dynamic mmap threshold keeps freed buffers of up to 32 MB in the heap, and whether it had risen
    # before the load varied from run to run (0.46x and 0.91x for the same load). Fixed at 128 KiB, a freed
    # buffer leaves RSS at once: the peak is what the load holds.
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(d), str(arch_dirs["llama"])], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["nf4_linears"] == 7 * layers
    assert rec["full"] > fp32, (rec, fp32)
    assert rec["streamed"] < 0.75 * fp32, (rec["streamed"] / fp32, rec)
