"""Shared by the export tests: a tiny random Llama saved with the tiny SmolLM2 tokenizer (tests/conftest.py),
and a run directory over it (export_runs.make_run)."""
from __future__ import annotations

import pytest

from export_runs import make_run
from forge_rt.testing import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model(smol_tok, tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", smol_tok)


@pytest.fixture(scope="session")
def tiny_run(tiny_model, smol_tok, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "nf4", tiny_model, smol_tok)
