"""What differs between architectures in a GGUF file, beside the tensor names gguf's own map gives: the
keys llama.cpp reads for each, the tensors it computes rather than loads (Llama 3.x rope factors), and how it
stores weights whose values differ from transformers' (Gemma's RMSNorm weights with the +1 folded in)."""
from __future__ import annotations

import gguf
import torch

from .source import ExportError

# HF model_type -> GGUF architecture (llama.cpp runs Mistral as llama).
HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
# llama.cpp multiplies by a Gemma RMSNorm weight as stored; transformers by (1 + weight). transformers'
# GGUF loader subtracts 1 from every tensor named *norm.weight of these architectures: the writer adds it.
NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}


def to_file_values(arch: str, gguf_tensor: str, weight: torch.Tensor) -> torch.Tensor:
    """A model weight as llama.cpp stores it: the inverse of transformers' GGUF tensor processing."""
    if arch in NORM_PLUS_ONE and gguf_tensor.endswith("norm.weight"):
        return weight.float() + 1
    return weight


def rope_theta(config) -> float:
    """The (global) rope base: flat rope_parameters, or per layer type (Gemma 3: full attention's)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope = rope.get("full_attention", rope)
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_kinds(config) -> tuple[set[str], dict]:
    """(the rope types of the config's layer types, the global rope parameters)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope:
        return {r.get("rope_type", "default") for r in rope.values()}, rope["full_attention"]
    return {rope.get("rope_type", "default")}, rope


# YaRN settings llama.cpp would not apply as transformers does, with the value that is safe: it derives the
# attention factor 0.1 ln(factor) + 1 from the factor alone, as transformers does when none of the first four is
# set, and the llama.cpp of the xllamacpp wheel runs a Llama with beta_fast 32 and beta_slow 1 whatever the file
# says (tests/models/test_rope_scaling.py fails with 8 and 2 written).
_YARN_DEFAULTS = {"attention_factor": None, "mscale": None, "mscale_all_dim": None, "partial_rotary_factor": None,
                  "beta_fast": 32, "beta_slow": 1, "truncate": True}


def check_rope(config) -> None:
    kinds, rope = _rope_kinds(config)
    if kinds - {"default", "llama3", "linear", "yarn"} or len(kinds - {"default"}) > 1:
        raise ExportError(f"rope scaling {sorted(kinds - {'default'})} is not supported by the GGUF writer (it writes "
                          "default, linear, yarn and llama3); export --to hf")
    odd = [f"{k} {rope[k]}" for k, v in _YARN_DEFAULTS.items() if "yarn" in kinds and rope.get(k) not in (None, v)]
    if odd:
        raise ExportError(f"YaRN rope with {', '.join(odd)}: llama.cpp would rotate or scale this model's attention "
                          "differently; export --to hf")


def write_rope_scaling(w: gguf.GGUFWriter, config) -> None:
    """Linear and YaRN rope scaling as llama.cpp's keys (Llama 3.x scaling is the rope_freqs tensor instead)."""
    kinds, rope = _rope_kinds(config)
    if "linear" in kinds:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif "yarn" in kinds:
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope.get("factor") or config.max_position_embeddings / original))
        w.add_rope_scaling_orig_ctx_len(int(original))


def write_arch_keys(w: gguf.GGUFWriter, arch: str, config) -> None:
    """The keys of `arch` beyond the common ones (_write_hf_metadata)."""
    write_rope_scaling(w, config)
    if arch == "gemma3":
        head_dim = config.head_dim
        if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
            # llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim) (hidden/heads for the 27B only)
            raise ExportError(f"query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim {head_dim}: "
                              "llama.cpp would scale this model's attention differently; export --to hf")
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            raise ExportError("Gemma 3 with logit soft-capping has no llama.cpp form; export --to hf")
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != pattern:  # llama.cpp fixes Gemma 3's: every sixth layer global
            raise ExportError(f"Gemma 3 layer types {config.layer_types} differ from llama.cpp's fixed pattern "
                              "(every sixth layer full attention); export --to hf")
        w.add_sliding_window(config.sliding_window)
        w.add_rope_freq_base_swa(float(config.rope_parameters["sliding_attention"]["rope_theta"]))


def extra_tensors(arch: str, config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that are not parameters: Llama 3.x rope scaling as per-frequency divisors
    (rope_freqs), the default inverse frequencies over the scaled ones, from transformers' own rope code."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if arch != "llama" or rope.get("rope_type") != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = scaled.numel() * 2
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": (plain / scaled.float())}
