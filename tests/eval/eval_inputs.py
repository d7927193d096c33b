"""What train.inputs gives RunEval, for the evaluation tests (a module of its own: `from conftest import`
finds whichever conftest was imported last)."""
from __future__ import annotations

from types import SimpleNamespace

from forge_rt import data


def make_inputs(evals_path, retention: str = "The quick brown fox jumps over the lazy dog. " * 8):
    """What train.inputs gives RunEval: held-out rows, retention text and the prompt format."""
    return SimpleNamespace(evals=data.load_examples(evals_path), retention=retention,
                           prompt=SimpleNamespace(name="model"))
