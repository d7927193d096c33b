"""Models the suite trains and generates with: the shipped SmolLM2-135M (real weights and prose, for the full
suite) or a randomly initialised Llama of SmolLM2's shape (no 35 s GGUF load, same per-layer work), and what a
LoRA step saves for backward."""
from __future__ import annotations

import torch

from forge_rt.testing import cut_layers, prose_ids

# SmolLM2-135M's dimensions (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab 49152).
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                     num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def build(kind: str, layers: int, batch: int, seq: int, dtype=torch.float32):
    """(model, input ids): kind "smollm2" (the shipped weights, prose), "smollm2-shape" or "tiny" (random)."""
    if kind == "smollm2":
        from forge_rt.models import load_model
        model, tok = load_model(dtype=torch.float32)
        return cut_layers(model, layers).to(dtype), prose_ids(tok, batch, seq)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    shape = SMOLLM2_SHAPE if kind == "smollm2-shape" else TINY_SHAPE
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape)).to(dtype)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, ids


def capture_saved(model, ids, min_bytes: int = 65536) -> list[torch.Tensor]:
    """Every distinct tensor a LoRA step saves for backward that paging would consider (not the weights)."""
    seen, out = set(), []

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if (key not in seen and t.numel() * t.element_size() >= min_bytes and not isinstance(t, torch.nn.Parameter)
                and not (t.is_leaf and t.requires_grad) and not isinstance(t._base, torch.nn.Parameter)):
            seen.add(key)
            out.append(t.detach().contiguous())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return out
