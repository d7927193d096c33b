"""Export on a tiny random Llama (SmolLM2 tokenizer): merge vs the unmerged adapted model, the hf export
in stock transformers, every GGUF read back with the gguf package, and the bad-input cases."""
from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from export_runs import PASSPHRASE, make_run
from forge_rt.export import ExportError, export_run, merge
from forge_rt.export.__main__ import main as export_main
from forge_rt.export.gguf_common import to_llamacpp_rows
from forge_rt.models import load_run
from forge_rt.models.gguf_reader import GGUFReader  # gguf's reader, parsing 4x faster

IDS = torch.tensor([[1, 513, 2045, 77, 9000, 12, 4, 300, 301, 30000], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    # transformers' reading of llama.cpp's q/k row order (independent of the writer's permutation)
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _fields(path) -> tuple[gguf.GGUFReader, dict]:
    r = GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def adapted(tiny_run):
    """The run's adapted model rebuilt the forge_rt way (generate.load_run, fused NF4), and its logits."""
    model, tok, _ = load_run(tiny_run)
    return _logits(model), tok


@pytest.mark.parametrize("no_fused", [False, True])
def test_merge_matches_unmerged(tiny_model, smol_tok, tmp_path, no_fused):
    run = make_run(tmp_path / "run", tiny_model, smol_tok, no_fused=no_fused)
    model, _, _ = load_run(run)
    ref = _logits(model)
    merged = merge(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert all(type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32 for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), ref, atol=1e-4, rtol=0)


def test_merge_bf16_is_layer_by_layer_and_close(tiny_run):
    model, _, _ = load_run(tiny_run)
    ref = _logits(model)
    merged = merge(model, torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert (_logits(merged) - ref).abs().max() < 0.05 * ref.abs().max()


def test_merge_bitsandbytes_base(tiny_model):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and name != "lm_head":
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4")
            q.support_avx512bf16_for_cpu = False  # the reference is bitsandbytes' fp32 path, not its bf16 kernel
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))  # .to() quantizes
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    ref = _logits(peft_model)
    repacked = copy.deepcopy(peft_model)
    merged = merge(peft_model)  # in place
    torch.testing.assert_close(_logits(merged), ref, atol=1e-4, rtol=1e-4)
    # On an AVX512-BF16 CPU bitsandbytes repacks each weight on its first eval forward (absmax rounded to
    # bf16): the merge reads that layout too, equal to the plain one up to that rounding.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    layers = [m for m in repacked.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                   layer.weight.quant_state)
    assert len(layers) == 14 and all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    for (name, a), b in zip(merged.state_dict().items(), merge(repacked).state_dict().values()):
        assert (b - a).abs().max() <= 2 ** -8 * a.abs().max(), name


def test_hf_export_loads_in_stock_transformers(tiny_run, adapted, tmp_path):
    out = tmp_path / "hf"
    rec, = export_run(tiny_run, {"hf": out})
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "hf.manifest.json").read_text())["bytes"] == rec["bytes"]
    # A separate interpreter in which forge_rt cannot be imported at all.
    code = ("import sys, torch; sys.modules['forge_rt'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"ids = torch.tensor({IDS.tolist()})\n"
            f"torch.save(m(input_ids=ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), adapted[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_gguf_model_read_back(tiny_run, smol_tok, tmp_path, quant):
    out = tmp_path / "m.gguf"
    rec, = export_run(tiny_run, {"gguf": out}, quant=quant)
    model, _, _ = load_run(tiny_run)
    merged = merge(model)
    cfg = merged.config
    r, kv = _fields(out)
    assert kv["general.architecture"] == "llama"
    assert kv["llama.block_count"] == 2 and kv["llama.embedding_length"] == 64
    assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
    assert kv["general.file_type"] == int(getattr(gguf.LlamaFileType, {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[quant]))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert kv["tokenizer.chat_template"] == smol_tok.chat_template
    assert kv["tokenizer.ggml.eos_token_id"] == smol_tok.eos_token_id
    names = {t.name: t for t in r.tensors}
    assert len(names) == 2 + 1 + 2 * 9  # embedding, output, final norm; 2 norms + 7 linears per block
    # Every tensor of the merged model, found by the gguf package's own name map, holds its weights.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tol = {"F32": 0.0, "F16": 2e-3, "Q8_0": 2e-2, "Q4_0": 0.2}  # of the tensor's largest magnitude
    seen = set()
    for hf, param in merged.state_dict().items():
        t = names[name_map.get_name(hf, try_suffixes=(".weight",))]
        seen.add(t.name)
        want = param.detach().float().numpy()
        # norms stay F32; the LM head stays at 8 bits under a 4-bit file type (llama.cpp's quantizer keeps it higher)
        kind = "F32" if want.ndim == 1 else ("Q8_0" if t.name == "output.weight" and quant == "q4_0" else quant.upper())
        assert t.tensor_type.name == kind, (hf, t.tensor_type.name)
        assert tuple(int(d) for d in t.shape) == want.shape[::-1], hf
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(t.name.split(".")[-2])
        if heads:
            got = _unpermute(got, heads)
        assert np.abs(got - want).max() <= tol[kind] * np.abs(want).max(), hf
    assert seen == set(names)
    assert json.loads((tmp_path / "m.gguf.manifest.json").read_text())["quant"] == quant
    assert rec["bytes"] == out.stat().st_size


def test_gguf_lora_read_back(tiny_run, tmp_path):
    out = tmp_path / "a.gguf"
    export_run(tiny_run, {"gguf-lora": out}, quant="f32")
    r, kv = _fields(out)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama" and kv["adapter.lora.alpha"] == 8.0
    names = {t.name: t for t in r.tensors}
    assert len(names) == 2 * 7 * 2
    from safetensors.torch import load_file
    sd = load_file(tiny_run / "adapter" / "adapter_model.safetensors")  # the adapter as PEFT saved it
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for key in (k for k in sd if ".lora_A." in k):
        hf = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        base = name_map.get_name(hf, try_suffixes=(".weight",))
        a, b = sd[key], sd[key.replace("lora_A", "lora_B")]
        ta, tb = names.pop(f"{base}.lora_a"), names.pop(f"{base}.lora_b")
        assert [int(d) for d in ta.shape] == [a.shape[1], 4] and [int(d) for d in tb.shape] == [4, b.shape[0]]
        np.testing.assert_array_equal(ta.data.reshape(a.shape), a.numpy())
        heads = {"attn_q": 4, "attn_k": 2}.get(base.split(".")[-2])  # B's rows follow llama.cpp's q/k order
        got_b = tb.data.reshape(b.shape)
        np.testing.assert_array_equal(_unpermute(got_b, heads) if heads else got_b, b.numpy())
    assert names == {}


def test_gguf_base_is_the_merge_without_the_adapter(tiny_run, tmp_path):
    """gguf-base holds the 4-bit base as training decoded it: the merged export minus scaling * B @ A,
    and not the original fp32 weights (those never met the adapter)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    recs = export_run(tiny_run, {"gguf": tmp_path / "m.gguf", "gguf-lora": tmp_path / "a.gguf",
                                 "gguf-base": tmp_path / "b.gguf"}, quant="f32")
    assert [r["kind"] for r in recs] == ["gguf-lora", "gguf", "gguf-base"]
    assert recs[0]["base_as_trained"] == str(tmp_path / "b.gguf")
    merged, _ = _fields(tmp_path / "m.gguf")
    base, kv = _fields(tmp_path / "b.gguf")
    assert kv["general.architecture"] == "llama"
    m, b = ({t.name: t.data for t in r.tensors} for r in (merged, base))
    assert m.keys() == b.keys()
    sd = load_file(tiny_run / "adapter" / "adapter_model.safetensors")
    original = AutoModelForCausalLM.from_pretrained(json.loads((tiny_run / "config.json").read_text())["model"])
    prefix = "base_model.model.model.layers.0.mlp.down_proj"
    delta = (sd[f"{prefix}.lora_B.weight"] @ sd[f"{prefix}.lora_A.weight"] * (8 / 4)).numpy()
    got = b["blk.0.ffn_down.weight"].reshape(delta.shape)
    np.testing.assert_allclose(got, m["blk.0.ffn_down.weight"].reshape(delta.shape) - delta, atol=1e-6)
    want = original.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert 0 < np.abs(got - want).max() < 0.2 * np.abs(want).max()  # NF4's rounding, no more
    np.testing.assert_array_equal(b["token_embd.weight"], m["token_embd.weight"])


def test_permutation_is_transformers_inverse():
    from types import SimpleNamespace
    w = torch.randn(3 * 8, 5)
    cfg = SimpleNamespace(num_attention_heads=6, num_key_value_heads=3)
    np.testing.assert_array_equal(_unpermute(to_llamacpp_rows(w, "blk.0.attn_k.weight", cfg).numpy(), 3), w.numpy())
    assert torch.equal(to_llamacpp_rows(w, "blk.0.attn_v.weight", cfg), w)


# ---- bad input -----------------------------------------------------------------------------------

def _cli(capsys, *argv) -> str:
    capsys.readouterr()  # drop what the fixtures printed
    assert export_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (model-loading progress bars may come first)
    assert err[-1].startswith("error: ") and sum(line.startswith("error") for line in err) == 1
    return err[-1]


def test_run_dir_without_adapter(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((tiny_run / "config.json").read_text())
    assert "has no adapter/" in _cli(capsys, run, "--to", "hf", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_base(tiny_run, smol_tok, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    smol_tok.save_pretrained(other)
    msg = _cli(capsys, "--adapter", tiny_run / "adapter", "--model", other, "--to", "gguf", "--out", tmp_path / "o.gguf")
    assert "does not fit base model" in msg
    assert list(tmp_path.glob("o.gguf*")) == [] and list(tmp_path.glob(".o.gguf*")) == []


def test_unsupported_arch_for_gguf(smol_tok, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(smol_tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt)
    smol_tok.save_pretrained(gpt)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    msg = _cli(capsys, "--adapter", adapter, "--model", gpt, "--to", "gguf", "--out", tmp_path / "o.gguf")
    assert "'gpt2' is not supported by the GGUF writer" in msg and "llama" in msg
    assert not list(tmp_path.glob("*o.gguf*"))


def test_quant_the_gguf_package_cannot_write(tiny_run, tmp_path, capsys):
    msg = _cli(capsys, tiny_run, "--to", "gguf", "--quant", "iq4_xs", "--out", tmp_path / "o.gguf")
    assert "cannot write" in msg and "f16, bf16, q8_0" in msg and "q4_0" in msg


def test_adapter_quant_checked_before_any_model_load(tiny_run, tmp_path):
    with pytest.raises(ExportError, match="--to gguf-lora takes one of f32, f16, bf16, q8_0"):
        export_run(tiny_run, {"gguf-lora": tmp_path / "a.gguf"}, quant="q4_0")


def test_output_exists_without_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep")
    assert "exists; pass --overwrite" in _cli(capsys, tiny_run, "--to", "gguf-lora", "--out", out)
    assert out.read_bytes() == b"keep"
    assert export_main([str(tiny_run), "--to", "gguf-lora", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("kind", ["gguf", "gguf-base", "gguf-lora"])
def test_disk_full_mid_write_leaves_nothing(kind, tiny_run, tmp_path, monkeypatch, capsys):
    """The disk fills after some tensors are written: one error line, no file, no partial file."""
    real, written = gguf.GGUFWriter.write_tensor_data, []

    def enospc_midway(self, tensor, *a, **k):
        if len(written) == 3:
            self.fout[0].write(b"\0" * 100)  # a few bytes of the 4th tensor land, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(tensor.nbytes)
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", enospc_midway)
    out = tmp_path / "m.gguf"
    assert "No space left on device" in _cli(capsys, tiny_run, "--to", kind, "--quant", "q8_0", "--out", out)
    assert len(written) == 3 and os.listdir(tmp_path) == []


def test_sealed_adapter(tiny_model, smol_tok, tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "sealed", tiny_model, smol_tok, seal_phrase=PASSPHRASE)
    monkeypatch.setenv("FORGE_RT_PASSPHRASE", "wrong " + PASSPHRASE)
    assert "wrong passphrase" in _cli(capsys, run, "--to", "gguf-lora", "--out", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    phrase = tmp_path / "phrase"
    phrase.write_text(PASSPHRASE + "\n")
    assert export_main([str(run), "--to", "gguf-lora", "--out", str(tmp_path / "a.gguf"),
                        "--passphrase-file", str(phrase)]) == 0
    assert GGUFReader(tmp_path / "a.gguf").fields["adapter.type"].contents() == "lora"
    # gguf-base beside a merge loads the model once: one passphrase, asked once
    from forge_rt.sovereign import seal
    asked = []
    monkeypatch.setattr(seal, "get_passphrase", lambda f: asked.append(f) or PASSPHRASE)
    monkeypatch.delenv("FORGE_RT_PASSPHRASE")
    recs = export_run(run, {"gguf": tmp_path / "m.gguf", "gguf-base": tmp_path / "b.gguf"})
    assert len(asked) == 1 and [r["kind"] for r in recs] == ["gguf", "gguf-base"]


def test_sealed_adapter_of_another_run_is_refused(tiny_model, smol_tok, tmp_path, monkeypatch, capsys):
    """A run directory holding another run's sealed adapter (bound at sealing to that run) is not exported."""
    from forge_rt.sovereign import seal
    from forge_rt.models import run_identity
    run = make_run(tmp_path / "run", tiny_model, smol_tok, seal_phrase=PASSPHRASE)
    other = make_run(tmp_path / "other", tiny_model, smol_tok)
    (other / "run_id").write_text("another run\n")
    (run / "adapter.sealed").unlink()
    seal.seal_dir(other / "adapter", run / "adapter.sealed", PASSPHRASE, kdf_params=(10, 8, 1),
                  binding=run_identity(other))
    monkeypatch.setenv("FORGE_RT_PASSPHRASE", PASSPHRASE)
    assert "another run's adapter" in _cli(capsys, run, "--to", "gguf-lora", "--out", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
