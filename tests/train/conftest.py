"""Fixtures shared by the trainer tests."""
import pytest

from forge_rt.testing import make_tiny_model_dir, tiny_rows, write_jsonl
from forge_rt import models as model_load


@pytest.fixture(scope="module")
def tiny(smol_tok, tmp_path_factory):
    """(model dir, train.jsonl): a tiny random Llama with SmolLM2's tokenizer, one per test module."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model_dir(root / "model", smol_tok), write_jsonl(root / "train.jsonl", tiny_rows())


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be reported before any model is loaded."""
    from forge_rt.train import run  # imported first: patched inside a test, its own binding would keep `fail`
    def fail(*a, **k):
        raise AssertionError("model loaded before the input was validated")
    monkeypatch.setattr(model_load, "load_model", fail)
    monkeypatch.setattr(run, "load_model", fail)  # the name the trainer calls
