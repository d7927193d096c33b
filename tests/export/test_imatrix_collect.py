"""--imatrix (trainer side): the importance matrix collected through the tuned model equals the mean squared
inputs computed directly from the model's own submodules, and it is what the export reads back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from forge_rt.export.imatrix import ImatrixError, read_imatrix_dat
from forge_rt.export.imatrix_collect import collect_imatrix, write_run_imatrix
from forge_rt.export.source import load, resolve
from forge_rt.train.config import ConfigError, TrainConfig

SEQS = [[1, 5, 9, 300, 42, 7], [2, 8, 1000, 3], [17] * 11]


def _direct(model, seqs):
    """Per-column mean of x^2 of the inputs of blocks 0 and 1's q_proj and of the LM head, from the model's
    hidden states and its own norms (no hooks)."""
    inner = model.get_base_model()
    q0, q1, head = [], [], []
    with torch.no_grad():
        for ids in seqs:
            out = inner(input_ids=torch.tensor([ids]), output_hidden_states=True)
            q0.append(inner.model.layers[0].input_layernorm(out.hidden_states[0])[0])
            q1.append(inner.model.layers[1].input_layernorm(out.hidden_states[1])[0])
            head.append(out.hidden_states[-1][0])  # transformers' last hidden state is after the final norm
    return {k: (torch.cat(v).double() ** 2).mean(0).float().numpy()
            for k, v in (("blk.0.attn_q.weight", q0), ("blk.1.attn_k.weight", q1), ("output.weight", head))}


def test_collected_equals_direct_means(tiny_run, tmp_path):
    model, _ = load(resolve(tiny_run))
    entries, seen = collect_imatrix(model, SEQS)
    assert seen == len(SEQS)
    n_layers = model.get_base_model().config.num_hidden_layers
    assert len(entries) == 7 * n_layers + 1  # every linear of every block, and the head
    for name, ref in _direct(model, SEQS).items():
        np.testing.assert_allclose(entries[name], ref, rtol=2e-3, atol=1e-6, err_msg=name)
    rec = write_run_imatrix(model, SEQS, tmp_path / "imatrix.dat")
    back = read_imatrix_dat(rec["path"])
    assert back.keys() == entries.keys()
    for name in entries:
        np.testing.assert_allclose(back[name], entries[name], rtol=1e-6)


def test_no_sequences_is_an_error(tiny_run):
    model, _ = load(resolve(tiny_run))
    with pytest.raises(ImatrixError, match="no training sequence"):
        collect_imatrix(model, [])


@pytest.mark.parametrize("flags", [dict(imatrix=True), dict(imatrix=True, export="gguf"),
                                   dict(imatrix=True, export="gguf-lora", export_quant="q8_0")])
def test_trainer_imatrix_needs_a_quantized_merged_export(flags):
    with pytest.raises(ConfigError, match="--imatrix weights the quantizer"):
        TrainConfig(**flags).validate()
    TrainConfig(imatrix=True, export="gguf", export_quant="q4_k_m").validate()


@pytest.mark.slow
def test_trainer_imatrix_collected_from_the_run_and_used(tiny_model, tmp_path):
    """--imatrix: RUN/export/imatrix.dat holds the tuned model's means over the run's training data (the same
    as collected again over the saved adapter), and the merged q4_k_m GGUF is quantized with it."""
    from forge_rt.cli import train
    from forge_rt.data import load_examples, tokenize_examples
    from forge_rt.export import export_run
    from forge_rt.testing import tiny_args, tiny_rows, write_jsonl
    data = write_jsonl(tmp_path / "train.jsonl", tiny_rows(8))
    run = tmp_path / "run"
    assert train.main(tiny_args(tiny_model, data, run, "--max-steps", "2", "--export", "gguf",
                                "--export-quant", "q4_k_m", "--imatrix", "--scrub", "off")) == 0
    dat = run / "export" / "imatrix.dat"
    got = read_imatrix_dat(dat)
    model, tok = load(resolve(run))
    ids = tokenize_examples(load_examples(data), tok, 64).input_ids
    want, _ = collect_imatrix(model, ids)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-7, err_msg=name)
    shipped = (run / "export" / "model-q4_k_m.gguf").read_bytes()
    export_run(run, {"gguf": tmp_path / "with.gguf"}, quant="q4_k_m", imatrix=dat)
    export_run(run, {"gguf": tmp_path / "without.gguf"}, quant="q4_k_m")
    assert shipped == (tmp_path / "with.gguf").read_bytes() != (tmp_path / "without.gguf").read_bytes()
