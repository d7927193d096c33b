"""The planner's weights and logits parts against real tensors: for every tiny architecture the NF4 bytes
and the other weights (embedding, an untied head, every norm, q/k norm and bias) of the model the trainer
builds; the embedding's dtype; a 262k-vocabulary config (Gemma 3 270M's shapes); and the chunked loss's
logits on a large vocabulary, measured with torch's profiler, beside the stock loss's."""
from __future__ import annotations

import pytest
import torch

from forge_rt import ops
from forge_rt.nn import NF4Linear
from forge_rt.plan import Shapes, estimate, plan
from forge_rt.plan.estimate import CHUNK_BYTES, NF4_BYTES_PER_WEIGHT
from forge_rt.testing import TINY_ARCHS, make_tiny_model_dir, peak_bytes

RATES = {"flops": 1e11}


def _measured(model) -> tuple[int, int]:
    """(bytes of the NF4 linears' storage, bytes of every other parameter, a shared one once). The 1 KiB
    code book of the double quantization, one per linear, is left out: the estimate leaves it out too (it is
    noise on a real model: 224 KiB on a 7B, but a third of a tiny model's 64 x 64 linear)."""
    nf4_bytes = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            w = m.nf4
            nf4_bytes += sum(t.numel() * t.element_size() for t in (w.packed, w.absmax, w.nested_absmax)
                             if t is not None)
    seen, other = set(), 0
    for name, p in model.named_parameters():
        if not isinstance(p, torch.Tensor) or ".weight" in name and isinstance(
                model.get_submodule(name.rsplit(".", 1)[0]), NF4Linear):
            continue
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            other += p.numel() * p.element_size()
    return nf4_bytes, other


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_weights_part_is_the_models_tensors(arch, smol_tok, tmp_path):
    from forge_rt.models import load_model
    d = make_tiny_model_dir(tmp_path / arch, smol_tok, arch)
    model, _ = load_model(d, nf4=True)
    nf4_bytes, other = _measured(model)
    shapes = Shapes.from_config(model.config)
    assert shapes.other_params() * shapes.embed_bytes == other  # exact: tied once, every norm and bias
    assert shapes.linear_params() * NF4_BYTES_PER_WEIGHT == pytest.approx(nf4_bytes, rel=0.005)
    est = estimate(shapes, 2, 32, checkpointing=True, chunked_loss=True)
    assert est.parts["weights"] == pytest.approx(nf4_bytes + other, rel=0.005)


def _gemma3_270m():
    from transformers import AutoConfig
    return AutoConfig.for_model("gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256)


def test_a_large_vocabulary_tied_and_untied_fp32_bf16_nf4():
    cfg = _gemma3_270m()
    tied = Shapes.from_config(cfg)
    assert tied.tied and 167_772_160 <= tied.other_params() < 167_772_160 + 200_000  # the embedding, once
    cfg.tie_word_embeddings = False
    untied = Shapes.from_config(cfg)
    assert untied.other_params() - tied.other_params() == 262144 * 640  # an untied head: a second matrix
    weights = {}
    for name, b in (("fp32", 4.0), ("bf16", 2.0), ("nf4", NF4_BYTES_PER_WEIGHT)):
        tied.embed_bytes = b
        weights[name] = estimate(tied, 1, 512, checkpointing=True, chunked_loss=True).parts["weights"]
    emb = tied.other_params()
    assert weights["fp32"] - weights["bf16"] == pytest.approx(2 * emb, abs=1)
    assert weights["bf16"] - weights["nf4"] == pytest.approx((2 - NF4_BYTES_PER_WEIGHT) * emb, abs=1)


@pytest.mark.parametrize("mode", ["auto", "speed", "min"])
def test_every_family_plans_the_chunked_loss(mode):
    """Every mode keeps the head's logits to one chunk, for a 262k vocabulary too."""
    from transformers import AutoConfig
    configs = [AutoConfig.for_model(TINY_ARCHS[a].get("model_type", a), **{
        k: v for k, v in TINY_ARCHS[a].items() if k != "model_type"}) for a in TINY_ARCHS] + [_gemma3_270m()]
    for cfg in configs:
        p = plan(Shapes.from_config(cfg), 8, 512, mode, rates=RATES)
        assert p.chunked_loss and p.parts["logits"] <= CHUNK_BYTES + 2 * 8 * 512 * cfg.hidden_size * 4, cfg.model_type


def test_logits_part_against_the_measured_loss():
    """The chunked loss's peak (forward and backward of the head + loss) is near the estimate's logits part
    and far below the stock path's [tokens, vocab] logits."""
    torch.manual_seed(0)
    vocab, hidden, tokens = 131072, 64, 256
    weight = torch.randn(vocab, hidden) * 0.02
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))

    def step():
        ops.linear_cross_entropy(h, weight, labels).backward()

    measured = peak_bytes(step)
    shapes = Shapes(vocab=vocab, hidden=hidden, intermediate=128, layers=1, heads=4, kv_heads=4, tied=True)
    chunked = estimate(shapes, 1, tokens, checkpointing=False, chunked_loss=True).parts["logits"]
    stock = estimate(shapes, 1, tokens, checkpointing=False, chunked_loss=False).parts["logits"]
    assert 0.5 * chunked <= measured <= 1.25 * chunked, (measured, chunked)
    assert measured < stock / 4
