import copy
import json
import math

import pytest
import torch

from forge_rt.data import demo_paths, load_examples, prompt_text
from forge_rt.eval.hf import evaluate, retention_perplexity
from forge_rt.eval.score import parse_json, score_predictions

REF = {"status": "INSPECT", "fault_code": "LEAK", "reason": "technician reports a leak"}


def _j(**change):
    return json.dumps({**REF, **change})


@pytest.mark.parametrize("text,expected", [
    (_j(), REF),
    ("```json\n" + _j() + "\n```", REF),
    ("Sure! Here it is: " + _j() + " Hope it helps.", REF),
    ("{not json} then " + _j(), REF),
    ('{"status": "NORMAL"', None),
    ("[1, 2]", None),
    ("", None),
])
def test_parse_json(text, expected):
    assert parse_json(text) == expected


def test_score_perfect_and_invalid():
    refs = [_j(), _j(status="NORMAL", fault_code="NONE", reason="all readings within limits")]
    perfect = score_predictions(refs, refs)
    assert perfect == {"score": 100.0, "exact": 1.0, "field_acc": 1.0, "valid_json": 1.0, "n": 2}
    invalid = score_predictions(["INSPECT, LEAK", '{"status": "INSPECT",'], refs)
    assert invalid == {"score": 0.0, "exact": 0.0, "field_acc": 0.0, "valid_json": 0.0, "n": 2}


def test_score_partial_by_hand():
    refs = [_j()] * 4
    preds = [
        "  " + _j(reason="Technician  reports a LEAK.") + "\n",  # normalized: all three fields match
        _j(reason="something else"),                           # verdict right, reason wrong
        _j(fault_code="SMOKE", reason="x"),                    # only status right
        "no json at all",
    ]
    s = score_predictions(preds, refs)
    assert s["exact"] == pytest.approx(2 / 4)
    assert s["field_acc"] == pytest.approx((1 + 2 / 3 + 1 / 3 + 0) / 4)
    assert s["valid_json"] == pytest.approx(3 / 4)
    assert s["score"] == pytest.approx(100 * (0.5 * 0.5 + 0.3 * 0.5 + 0.2 * 0.75))


def test_score_missing_key_and_text_tasks():
    s = score_predictions(['{"status": "INSPECT", "fault_code": "LEAK"}'], [_j()])
    assert (s["exact"], s["field_acc"], s["valid_json"]) == (1.0, pytest.approx(2 / 3), 1.0)
    # references that are not JSON objects: plain text match
    t = score_predictions(["Paris.", "london"], ["paris", "Rome"])
    assert t == {"score": 50.0, "exact": 0.5, "field_acc": 0.5, "valid_json": None, "n": 2}
    with pytest.raises(ValueError):
        score_predictions(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        score_predictions([], [])


def test_retention_perplexity_matches_direct_computation(smollm2):
    model, tok = smollm2
    text = demo_paths()["retention"].read_text()[:100]
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        full = math.exp(model(input_ids=ids, labels=ids).loss.item())
        assert retention_perplexity(model, tok, text, window=n) == pytest.approx(full, rel=1e-4)
        # sliding windows: each token j scored once, with context from the first window that reaches it
        window, stride = 8, 4
        nll = 0.0
        for j in range(1, n):
            begin = max(0, math.ceil((j - window + 1) / stride)) * stride
            logp = torch.log_softmax(model(input_ids=ids[:, begin:j], logits_to_keep=1).logits[0, -1], -1)
            nll -= logp[ids[0, j]].item()
        oracle = math.exp(nll / (n - 1))
    assert retention_perplexity(model, tok, text, window=window, stride=stride) == pytest.approx(oracle, rel=1e-4)


def test_evaluate_base_model_scores_low_and_works_with_peft(smollm2):
    from peft import LoraConfig, get_peft_model

    model, tok = smollm2
    examples = load_examples(demo_paths()["eval"])[:8]
    retention = demo_paths()["retention"].read_text()[:600]
    # A fresh LoRA adapter (B = 0) leaves the model's function unchanged, so through PEFT we still
    # measure the base model.
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    r = evaluate(peft_model, tok, examples, retention, batch_size=8, max_new_tokens=24)
    assert peft_model.training, "evaluate must restore the training mode"
    assert set(r) >= {"score", "exact", "field_acc", "valid_json", "ppl_retention", "n", "samples"}
    assert r["n"] == 8 and len(r["samples"]) == 5
    assert r["score"] < 30 and r["exact"] < 0.5
    assert 1 < r["ppl_retention"] < 1000
    assert r["ppl_retention"] == pytest.approx(retention_perplexity(model, tok, retention), rel=1e-4)
    # oracle for the batched, left-padded generation: the plain model, one unpadded prompt at a time
    ids = tok(prompt_text(tok, examples[0]["messages"]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert r["samples"][0]["prediction"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
