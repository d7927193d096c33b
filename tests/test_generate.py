"""`forge_rt.generate` and the adapter a run writes: stock PEFT, loading adapter/ onto the base,
gives the logits of forge_rt's own (NF4 + fused kernels) inference."""
from __future__ import annotations

import pytest
import torch

from forge_rt import nf4
from forge_rt.cli import generate, train
from forge_rt.testing import make_tiny_model_dir, tiny_args, tiny_rows, write_jsonl


@pytest.fixture(scope="module")
def run_dir(smol_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model_dir = make_tiny_model_dir(root / "model", smol_tok)
    data = write_jsonl(root / "train.jsonl", tiny_rows())
    run = root / "run"
    assert train.main(tiny_args(model_dir, data, run, "--max-steps", "3", "--lr", "2e-2", "--lora-dropout", "0")) == 0
    return model_dir, run


def _stock_model_on_nf4_values(model_dir, adapter_dir):
    """Stock transformers + stock PEFT: plain nn.Linear layers holding the NF4-rounded weights that
    forge_rt trained against, with the run's adapter loaded by PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in base.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod is not base.get_output_embeddings():
                mod.weight.copy_(nf4.dequantize(nf4.quantize(mod.weight.data)))
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def test_stock_peft_logits_match_forge_rt_inference(run_dir):
    model_dir, run = run_dir
    ours, tok, cfg = generate.load_run(run)
    assert cfg.fused and ours.forge_rt_summary["accelerated"] > 0
    stock = _stock_model_on_nf4_values(model_dir, run / "adapter")
    batch = tok(["Reading 3: temperature 61 C. Verdict?", "a much longer second prompt, padded less"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**batch).logits
        b = stock(**batch).logits
        with stock.disable_adapter():
            no_adapter = stock(**batch).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (no_adapter - b).abs().max().item() > 1e-3  # the adapter is really in play


def test_generate_cli_tuned_and_base(run_dir, capsys):
    _, run = run_dir
    assert generate.main(["--run", str(run), "--base", "--max-new-tokens", "3", "Reading 1: temperature 47 C."]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tuned: ") and out[1].startswith("base:  ")


def test_generate_rejects_non_run_dir(tmp_path, capsys):
    assert generate.main(["--run", str(tmp_path), "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
