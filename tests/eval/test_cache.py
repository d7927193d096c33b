"""The base model's held-out result is cached per model, held-out rows, prompt format, generation length,
engine and retention text: a second run with the same ones reuses it (and says so), a change measures again.
A missing xllamacpp falls back to PyTorch with one line."""
from __future__ import annotations

import json
import sys

import pytest

from eval_inputs import make_inputs
from forge_rt.core.dist import SINGLE
from forge_rt.testing import tiny_args, tiny_rows, write_jsonl
from forge_rt.train.config import TrainConfig
from forge_rt.train.evaluation import RunEval
from forge_rt.train.place import RunError


def _ev(model_dir, evals_path, engine="pytorch", **kw):
    cfg = TrainConfig(model=str(model_dir), eval_batch_size=2, eval_engine=engine, **{"max_new_tokens": 4, **kw})
    return RunEval(cfg, make_inputs(evals_path), SINGLE)


def test_base_result_is_reused_only_for_the_same_evaluation(tiny_dir, tiny_peft, tmp_path, capsys):
    model_dir, evals = tiny_dir
    model, tok = tiny_peft
    with model.disable_adapter():
        first = _ev(model_dir, evals).base(model, tok)
        again = _ev(model_dir, evals).base(model, tok)
        assert first["cached"] is False and again["cached"] is True
        assert "eval: base model: cached" in capsys.readouterr().out
        for key in ("score", "exact", "field_acc", "valid_json", "ppl_retention", "samples"):
            assert again[key] == first[key], key
        rows = tiny_rows(6)
        rows[3]["completion"] = rows[3]["completion"].replace("case 3", "case three")  # one reference changes
        assert _ev(model_dir, write_jsonl(tmp_path / "changed.jsonl", rows)).base(model, tok)["cached"] is False
        assert _ev(model_dir, evals, max_new_tokens=5).base(model, tok)["cached"] is False
        assert _ev(model_dir, evals, no_fused=True).base(model, tok)["cached"] is False  # another base model
        other_retention = RunEval(TrainConfig(model=str(model_dir), max_new_tokens=4, eval_batch_size=2,
                                              eval_engine="pytorch"), make_inputs(evals, "Other text. " * 9), SINGLE)
        assert other_retention.base(model, tok)["cached"] is False
        assert _ev(model_dir, evals).base(model, tok)["cached"] is True  # the first entry is still there


def test_engine_is_part_of_the_key(tiny_dir, tiny_peft):
    pytest.importorskip("xllamacpp")
    model_dir, evals = tiny_dir
    model, tok = tiny_peft
    assert _ev(model_dir, evals).base_cache(tok).path != _ev(model_dir, evals, "llamacpp").base_cache(tok).path


def test_missing_xllamacpp_falls_back_to_pytorch_in_one_line(tiny_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # import xllamacpp now raises ImportError
    ev = _ev(*tiny_dir, engine="auto")
    out = capsys.readouterr().out.strip().splitlines()
    assert ev.engine == "pytorch"
    assert out == ["eval: in PyTorch, not llama.cpp: xllamacpp is not installed (pip install 'forge_rt[export]')"]
    with pytest.raises(RunError, match="--eval-engine llamacpp: xllamacpp is not installed"):
        _ev(*tiny_dir, engine="llamacpp")


def test_second_run_reports_the_base_result_as_cached(tiny_dir, tmp_path, capsys):
    """Two trainer runs, same base and held-out data: the second skips the base evaluation and says so in the
    console, metrics.json and report.md; its base score is the first run's."""
    from forge_rt.cli import train
    model_dir, evals = tiny_dir
    data = write_jsonl(tmp_path / "train.jsonl", tiny_rows(8))
    metrics = []
    for name in ("a", "b"):
        args = tiny_args(model_dir, data, tmp_path / name, "--max-steps", "1", "--eval-data", str(evals),
                         "--max-new-tokens", "4")
        args.remove("--no-eval")
        assert train.main(args) == 0
        metrics.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    first, second = metrics
    assert first["eval"]["base_cached"] is False and second["eval"]["base_cached"] is True
    assert second["score_base"] == first["score_base"]
    assert second["ppl_retention_base"] == first["ppl_retention_base"]
    assert "base model cached" in (tmp_path / "b" / "report.md").read_text()
    assert capsys.readouterr().out.count("eval: base model: cached") == 1
