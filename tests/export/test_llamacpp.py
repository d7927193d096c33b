"""Exported GGUFs in a real llama.cpp (xllamacpp): greedy chat answers against the PyTorch model."""
from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from export_runs import make_run
from forge_rt.export import export_run, merge
from forge_rt.export.gguf_common import to_llamacpp_rows
from forge_rt.export.gguf_model import write_gguf
from forge_rt.models import load_run

pytest.importorskip("xllamacpp")
from forge_rt.eval.llamacpp import LlamaCppEngine, evaluate_gguf  # noqa: E402
from forge_rt.models.gguf_reader import GGUFReader  # gguf's reader, parsing 4x faster

pytestmark = pytest.mark.slow
PROMPTS = ["Reading 3: temperature 61 C. Verdict?", "What is the capital of France?", "Say hello.",
           "Pump P-3 vibrates at 9 mm/s. Status?", "List three colours."]


def _torch_answers(model, tok, n_tokens, n_prompts=len(PROMPTS)):
    out = []
    for p in PROMPTS[:n_prompts]:
        enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _llamacpp_answers(gguf_path, n_tokens, lora=None, n_prompts=len(PROMPTS)):
    engine = LlamaCppEngine(gguf_path, lora, n_ctx=512, threads=1)
    return engine.answers([[{"role": "user", "content": p}] for p in PROMPTS[:n_prompts]], n_tokens)


def test_tiny_merged_gguf_answers_like_pytorch(tiny_run, tmp_path):
    out = tmp_path / "m.gguf"
    export_run(tiny_run, {"gguf": out}, quant="f32")
    model, tok, _ = load_run(tiny_run)
    assert _llamacpp_answers(out, 12) == _torch_answers(merge(model), tok, 12)


def test_tiny_base_plus_lora_gguf_answers_like_pytorch(tiny_model, smol_tok, tmp_path):
    from transformers import AutoModelForCausalLM
    run = make_run(tmp_path / "run", tiny_model, smol_tok, no_fused=True)  # fp32 base, as the base GGUF holds
    base_gguf, lora = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(tiny_model), smol_tok, base_gguf, "f32", None)
    export_run(run, {"gguf-lora": lora}, quant="f32")
    model, tok, _ = load_run(run)
    assert _llamacpp_answers(base_gguf, 12, lora) == _torch_answers(model, tok, 12)


def test_tiny_gguf_base_plus_lora_answers_like_the_nf4_model(tiny_run, tmp_path):
    """The adapter over the base as trained (gguf-base: NF4 decoded) answers like the model that trained it."""
    base_gguf, lora = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    export_run(tiny_run, {"gguf-lora": lora, "gguf-base": base_gguf}, quant="f32")
    model, tok, _ = load_run(tiny_run)
    assert _llamacpp_answers(base_gguf, 12, lora) == _torch_answers(model, tok, 12)


def test_smollm2_gguf_in_gguf_out(smollm2, tmp_path):
    """The shipped Q4_1 GGUF: q/k permutation against the file's own tensors, metadata carried over,
    merged and adapter exports answering in llama.cpp like PyTorch."""
    from peft import LoraConfig, get_peft_model
    from forge_rt import quantize_model
    from forge_rt.models import default_gguf_path
    src = default_gguf_path()
    model, tok = smollm2
    reader = GGUFReader(src)
    tensors = {t.name: t for t in reader.tensors}
    for name, hf in (("blk.3.attn_q.weight", "q_proj"), ("blk.3.attn_k.weight", "k_proj")):
        t = tensors[name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        got = to_llamacpp_rows(model.model.layers[3].self_attn.get_submodule(hf).weight.detach(), name, model.config)
        np.testing.assert_array_equal(got.numpy(), want)

    torch.manual_seed(0)
    peft_model = get_peft_model(quantize_model(copy.deepcopy(model)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.02)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_out, lora_out = tmp_path / "m.gguf", tmp_path / "a.gguf"
    recs = export_run(None, {"gguf": merged_out, "gguf-lora": lora_out}, adapter=tmp_path / "adapter", model=src)
    assert {r["kind"] for r in recs} == {"gguf", "gguf-lora"}
    out_reader = GGUFReader(merged_out)
    skip = ("GGUF.", "general.file_type")
    src_kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(skip)}
    assert {k: f.contents() for k, f in out_reader.fields.items() if not k.startswith(skip)} == src_kv
    assert [t.name for t in out_reader.tensors] == list(tensors)
    assert lora_out.stat().st_size < 2 * 2**20

    peft_model.eval()
    # Three prompts, 12 tokens: exact (all five over 16 tokens were; the tiny f32 tests cover every prompt)
    assert _llamacpp_answers(merged_out, 12, n_prompts=3) == _torch_answers(merge(peft_model), tok, 12, n_prompts=3)
    # The adapter goes over the unchanged Q4_1 base, so the oracle is the adapter over the fp32 decode of
    # that file (not training's NF4 base). llama.cpp's Q4_1 path rounds activations to 8 bits, so answers
    # drift apart after a while (measured: 2 of 5 identical over 16 tokens, 4 of 5 over the first 24
    # characters); the exact check of the adapter format is the tiny-model test above.
    from peft import PeftModel
    over_q4 = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    lora_answers = _llamacpp_answers(src, 16, lora_out)
    want = _torch_answers(over_q4, tok, 16)
    assert sum(a[:24] == b[:24] for a, b in zip(lora_answers, want)) >= 3


def test_evaluate_gguf_scores_with_forge_rt_scoring(tiny_run, tmp_path):
    from forge_rt.cli.evaluate import main
    out = tmp_path / "m.gguf"
    export_run(tiny_run, {"gguf": out}, quant="q8_0")
    # References equal to llama.cpp's own answers (asked here directly) must score 100; one of two off, 50.
    answers = _llamacpp_answers(out, 8)[:2]
    assert all(answers), answers
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(PROMPTS, answers)]
    res = evaluate_gguf(out, eval_rows=rows, max_new_tokens=8, threads=1)
    assert res["n"] == 2 and res["score"] == 100 and [s["prediction"] for s in res["samples"]] == answers
    rows[1]["messages"][-1]["content"] += " and more"
    assert evaluate_gguf(out, eval_rows=rows, max_new_tokens=8, threads=1)["score"] == 50
    assert main(["--gguf", str(tmp_path / "missing.gguf"), "--limit", "1"]) == 2
