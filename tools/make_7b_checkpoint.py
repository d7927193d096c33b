"""Writes a randomly initialised Llama-2-7B-shaped checkpoint: bf16 safetensors shards + index, config.json
and SmolLM2's tokenizer. THE WEIGHTS ARE RANDOM (normal, std 0.02): it measures memory and time, not
quality. The vocabulary is the tokenizer's (SmolLM2, 49152) when larger than 32000, so real text
trains: about 14 GB at the full shape; `--layers/--hidden/--intermediate/--vocab` shrink it for tests.

    python tools/make_7b_checkpoint.py OUT_DIR [--shard-gb 2]

Tensors are written one shard at a time, so writing needs about one shard of memory, not the model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)


def tensor_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM parameter names -> shapes (untied head, no biases, multi-head attention)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}.weight": (hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def _config(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, tok) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "hidden_act": "silu", "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "note": "random weights (forge_rt tools/make_7b_checkpoint.py)"}


def write_checkpoint(out: Path, hidden: int, intermediate: int, layers: int, heads: int, vocab: int,
                     shard_bytes: int, tokenizer) -> Path:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(hidden, intermediate, layers, vocab)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen, weight_map = torch.Generator().manual_seed(0), {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                       torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(_config(hidden, intermediate, layers, heads, vocab, tokenizer), indent=1))
    tokenizer.save_pretrained(out)
    return out


def smollm2_tokenizer():
    from transformers import AutoTokenizer
    from forge_rt.models import default_gguf_path
    path = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    for k, v in LLAMA2_7B.items():
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--shard-gb", type=float, default=2.0)
    a = p.parse_args(argv)
    tok = smollm2_tokenizer()  # a real tokenizer for a random model; ids past its vocabulary are never produced
    write_checkpoint(a.out, a.hidden, a.intermediate, a.layers, a.heads, max(a.vocab, len(tok)),
                     int(a.shard_gb * 2**30), tok)
    print(f"wrote {a.out} (RANDOM weights, bf16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
