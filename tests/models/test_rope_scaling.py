"""Rope scaling from a HF config into GGUF (linear and YaRN as keys, Llama 3.x as the rope_freqs tensor): a tiny
random Llama / Qwen2 with each runs in llama.cpp like PyTorch over a prompt long enough that every rotary
frequency turns (the oracle: transformers' rope code on one side, llama.cpp's on the other); what llama.cpp
cannot reproduce is refused. Attention is sharpened first: at init's scale it is near uniform and blind to
positions (test_archs' llama3 case passes with rope_freqs left out; these fail without it, or without the keys)."""
import pytest
import torch

from arch_models import assert_llamacpp_matches, write_source_gguf

from forge_rt.export.gguf_arch import check_rope
from forge_rt.export.source import ExportError
from forge_rt.testing import make_tiny_model_dir

pytest.importorskip("xllamacpp")
PROMPT = "Reading 12: temperature 77 C, rising; vibration 3.8 mm/s; pressure 2.8 bar. Verdict? " * 2

SCALINGS = {
    "llama3": ("llama3", None),
    "linear": ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn_long": ("llama", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                            "original_max_position_embeddings": 2048}),
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_runs_in_llamacpp_like_pytorch(name, small_tok, tmp_path):
    from transformers import AutoModelForCausalLM
    arch, rope = SCALINGS[name]
    d = make_tiny_model_dir(tmp_path / "hf", small_tok, arch, **({"rope_parameters": rope} if rope else {}))
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():  # sharper attention (see above)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    model.save_pretrained(d)
    assert model.config.rope_parameters["rope_type"] == (rope or {"rope_type": "llama3"})["rope_type"]
    assert_llamacpp_matches(model, write_source_gguf(d, small_tok, tmp_path / "f32.gguf"), small_tok, prompt=PROMPT)


@pytest.mark.parametrize("rope, says", [
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "rope scaling ['dynamic']"),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
      "attention_factor": 1.5}, "YaRN rope with attention_factor 1.5"),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 2048,
      "beta_fast": 8.0, "beta_slow": 2.0}, "YaRN rope with beta_fast 8.0, beta_slow 2.0"),
])
def test_rope_llamacpp_would_compute_differently_is_refused(rope, says):
    from transformers import AutoConfig
    with pytest.raises(ExportError, match=says.replace("[", r"\[").replace("]", r"\]")):
        check_rope(AutoConfig.for_model("llama", rope_parameters=rope))
