"""Tiny fp32 LoRA models for the privacy tests: a random 2-layer Llama, NF4-quantized and accelerated
(forge_rt's fused path) or dense (stock PEFT), with non-zero LoRA B so every gradient is exercised."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import forge_rt.nn as fnn  # noqa: E402

VOCAB = 96


def tiny_lora(fused: bool = True, seed: int = 0, dropout: float = 0.0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if fused:
        model = fnn.quantize_model(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    lora_dropout=dropout))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if fused:
        fnn.accelerate(pm)
        assert pm.forge_rt_summary["accelerated"] == 14
    return pm.train()


def batch(lengths=(10, 7, 9, 5), prompt: int = 2, seed: int = 3) -> dict:
    """Right-padded random token rows (as forge_rt's collate pads), labels on all but the first `prompt`
    tokens of each row."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        labels[i, prompt:n] = ids[i, prompt:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def naive_per_example(model, b: dict) -> list[dict[str, torch.Tensor]]:
    """Each example alone (its own row without padding), HF's own loss, autograd: {name: grad}."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(b["input_ids"].shape[0]):
        n = int(b["attention_mask"][i].sum())
        loss = model(input_ids=b["input_ids"][i:i + 1, :n], labels=b["labels"][i:i + 1, :n], use_cache=False).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        out.append({k: g.detach().clone() for k, g in zip(params, grads)})
    return out
