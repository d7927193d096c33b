"""The held-out evaluation in llama.cpp answers like PyTorch: the same prompts (token ids), the base as trained
(gguf-base) with and without this run's adapter (gguf-lora), several sequences decoded at once."""
from __future__ import annotations

import pytest

from eval_inputs import make_inputs
from forge_rt.core.dist import SINGLE
from forge_rt.eval.hf import generate_answers
from forge_rt.train.config import TrainConfig

pytest.importorskip("xllamacpp")
from forge_rt.eval.engine import llamacpp_answers, prompt_ids  # noqa: E402
from forge_rt.train.evaluation import RunEval  # noqa: E402

N_TOKENS = 12


def _evaluator(model_dir, evals_path, **kw):
    cfg = TrainConfig(model=str(model_dir), max_new_tokens=N_TOKENS, eval_batch_size=4, eval_engine="llamacpp", **kw)
    return RunEval(cfg, make_inputs(evals_path), SINGLE)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_llamacpp_answers_equal_pytorch_answers(tiny_dir, tiny_peft, tmp_path, quant):
    """Every answer, base and tuned, is the PyTorch one (PyTorch one row at a time: no padding)."""
    model, tok = tiny_peft
    ev = _evaluator(*tiny_dir)
    rows = ev.inputs.evals
    base_gguf, _ = ev.base_gguf(model, tok, quant)
    lora = ev.lora_gguf(model, tmp_path)
    ids = prompt_ids(tok, rows)
    tuned_pt = generate_answers(model, tok, rows, batch_size=1, max_new_tokens=N_TOKENS)
    with model.disable_adapter():
        base_pt = generate_answers(model, tok, rows, batch_size=1, max_new_tokens=N_TOKENS)
    assert tuned_pt != base_pt  # the adapter matters, so a dropped adapter would show
    assert llamacpp_answers(base_gguf, lora, ids, N_TOKENS, parallel=4, threads=1) == tuned_pt
    assert llamacpp_answers(base_gguf, None, ids, N_TOKENS, parallel=4, threads=1) == base_pt


def test_evaluate_llamacpp_scores_and_keeps_retention_in_pytorch(tiny_dir, tiny_peft, tmp_path):
    from forge_rt.eval.hf import evaluate
    model, tok = tiny_peft
    ev = _evaluator(*tiny_dir)
    res = ev.tuned(model, tok)
    ref = evaluate(model, tok, ev.inputs.evals, ev.inputs.retention, batch_size=1, max_new_tokens=N_TOKENS)
    assert res["engine"] == "llama.cpp" and ref["engine"] == "pytorch"
    assert res["score"] == ref["score"] and res["samples"] == ref["samples"]
    assert res["ppl_retention"] == ref["ppl_retention"]
    assert res["gguf_base_cached"] is False and ev.tuned(model, tok)["gguf_base_cached"] is True


def test_gguf_base_is_cached_per_base_and_settings(tiny_dir, tiny_peft, private_cache):
    model, tok = tiny_peft
    ev = _evaluator(*tiny_dir)
    first, cached = ev.base_gguf(model, tok)
    assert not cached and first.is_relative_to(private_cache)
    again, cached = ev.base_gguf(model, tok)
    assert cached and again == first
    other, cached = ev.base_gguf(model, tok, "f32")
    assert not cached and other != first


def test_llamacpp_perplexity_equals_pytorch(tiny_dir, tiny_peft, tmp_path):
    """Teacher-forced log-probs from llama.cpp (the forced token's raw log-prob) over the same sliding windows
    give PyTorch's retention perplexity of the same weights, adapter included (and not the base's)."""
    from forge_rt.data import demo_paths
    from forge_rt.eval.hf import retention_perplexity
    from forge_rt.eval.llamacpp import LlamaCppEngine
    model, tok = tiny_peft
    ev = _evaluator(*tiny_dir)
    base_gguf, _ = ev.base_gguf(model, tok, "f32")
    engine = LlamaCppEngine(base_gguf, ev.lora_gguf(model, tmp_path), n_ctx=256, threads=1)
    text = demo_paths()["retention"].read_text()[:400]
    ids = tok(text, add_special_tokens=False).input_ids
    ref = retention_perplexity(model, tok, text, window=48, stride=24)
    with model.disable_adapter():
        base = retention_perplexity(model, tok, text, window=48, stride=24)
    assert len(ids) > 60 and abs(base / ref - 1) > 2e-3  # the adapter matters here (random weights: near uniform)
    got = engine.perplexity(ids, window=48, stride=24)
    assert got == pytest.approx(ref, rel=2e-4), (got, ref, base)
