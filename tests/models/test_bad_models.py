"""Models forge_rt cannot train as given, each one `error:` line from the trainer before any training: an
architecture without a fused (streaming NF4) path, naming it and the --no-fused fallback; a multimodal
checkpoint (vision tower) where a text model is expected; a vision projector GGUF (mmproj)."""
from __future__ import annotations


import gguf
import numpy as np
import pytest

from forge_rt.cli import train
from forge_rt.testing import tiny_args, tiny_rows, write_jsonl


def _one_error(model, tmp_path, capsys, *needles):
    run = tmp_path / "run"
    assert train.main(tiny_args(model, write_jsonl(tmp_path / "t.jsonl", tiny_rows(8)), run)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1, err
    for n in (str(model), *needles):
        assert n in errors[0], (n, errors[0])
    assert not (run / "metrics.jsonl").exists()


def test_an_architecture_without_a_fused_path(smol_tok, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM
    d = tmp_path / "neox"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_neox", vocab_size=len(smol_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(d)
    smol_tok.save_pretrained(d)
    _one_error(d, tmp_path, capsys, "'gpt_neox'", "--no-fused")


def _config_only_checkpoint(d, config, tok):
    """A directory with the config of `config`, a (placeholder) weights file and a tokenizer: the refusal
    must come from the config, before any weight is read."""
    config.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["gemma3", "llava"])
def test_a_multimodal_checkpoint(kind, smol_tok, tmp_path, capsys):
    from transformers import AutoConfig
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    if kind == "gemma3":
        cfg = AutoConfig.for_model("gemma3", text_config={"vocab_size": len(smol_tok), "hidden_size": 64},
                                   vision_config=vision, architectures=["Gemma3ForConditionalGeneration"])
    else:
        cfg = AutoConfig.for_model("llava", text_config={"model_type": "llama", "vocab_size": len(smol_tok)},
                                   vision_config={"model_type": "clip_vision_model", **vision},
                                   architectures=["LlavaForConditionalGeneration"])
    d = _config_only_checkpoint(tmp_path / kind, cfg, smol_tok)
    _one_error(d, tmp_path, capsys, "multimodal", "ForConditionalGeneration", "text-only")


def test_a_vision_projector_gguf(tmp_path, capsys):
    p = tmp_path / "mmproj.gguf"
    w = gguf.GGUFWriter(p, "clip")
    w.add_tensor("v.patch_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_error(p, tmp_path, capsys, "mmproj", "text model")


def test_the_up_front_gguf_check_keeps_no_parsed_reader():
    """A parsed GGUFReader holds every vocabulary entry (Gemma 3's: 684 MiB of RSS); the check and the
    rope_freqs read keep only the facts they need, so nothing of the parse lives on through training."""
    import gc

    from forge_rt.models import default_gguf_path
    from forge_rt.models.paths import check_model_path, gguf_facts
    check_model_path(default_gguf_path())
    assert gguf_facts(default_gguf_path()).arch == "llama"
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, gguf.GGUFReader)]
