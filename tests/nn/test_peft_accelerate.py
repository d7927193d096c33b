"""forge_rt.nn (quantize_model, accelerate) on SmolLM2 cut to its first decoder layer, and to its first DEEP_LAYERS
(deep enough for the fused path's rounding to accumulate over layers against a 1e-4 bound): accelerate vs
stock PEFT over bitsandbytes 4-bit, quantize_model + PEFT training, undo, and the skip summary."""
import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import forge_rt.nn as swap  # noqa: E402
from forge_rt.testing import LLAMA_TARGETS, cut_layers, rel_err, to_bnb4bit  # noqa: E402
from forge_rt.nn import peft as fused_peft  # noqa: E402

TARGETS = list(LLAMA_TARGETS)
N_LAYERS = 1
DEEP_LAYERS = 8  # of 30: the whole model through bitsandbytes' CPU path took minutes for the same check


def _cut_lm(smollm2, n_layers):
    """A private fp32 copy of SmolLM2 with only its first n decoder layers, and a fixed token batch."""
    model, tok = smollm2
    # Share (don't copy) the decoder layers that get dropped; the session model itself is untouched.
    base = copy.deepcopy(model, {id(layer): layer for layer in model.model.layers[n_layers:]})
    cut_layers(base, n_layers)
    text = ["The capital of France is Paris, and the capital of Italy is Rome, as every atlas says.",
            "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees."]
    ids = torch.stack([tok(t, return_tensors="pt").input_ids[0, :16] for t in text])
    return base.eval(), ids


@pytest.fixture
def small_lm(smollm2):
    return _cut_lm(smollm2, N_LAYERS)


@pytest.fixture
def deep_lm(smollm2):
    return _cut_lm(smollm2, DEEP_LAYERS)


def _lora(model, **kw):
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=kw.pop("lora_dropout", 0.0), **kw)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so the LoRA term (and grad A) is exercised
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return pm


def _step(pm, ids):
    pm.zero_grad()
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("lm", ["small_lm", "deep_lm"])
def test_accelerate_matches_stock_peft_over_bitsandbytes(lm, request):
    model, ids = request.getfixturevalue(lm)
    pm = _lora(to_bnb4bit(model))
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    logits_ref, grads_ref = _step(pm, ids)

    swap.accelerate(pm)
    n_layers = model.config.num_hidden_layers
    assert pm.forge_rt_summary == {"enabled": True, "accelerated": 7 * n_layers, "skipped": {}}
    logits, grads = _step(pm, ids)
    assert rel_err(logits, logits_ref) < 1e-4
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * n_layers
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


def test_disable_restores_stock_forward_and_saved_adapter(small_lm, tmp_path):
    model, ids = small_lm
    pm = _lora(swap.quantize_model(model))
    names_before = [n for n, _ in pm.named_parameters()]
    with torch.no_grad():
        stock = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "stock")

    swap.accelerate(pm)
    assert [n for n, _ in pm.named_parameters()] == names_before
    with torch.no_grad():
        fused = pm(input_ids=ids).logits
    assert rel_err(fused, stock) < 1e-4
    pm.save_pretrained(tmp_path / "fused")

    swap.accelerate(pm, enable=False)
    assert not any(fused_peft.is_fused(m) for m in pm.modules())
    assert pm.forge_rt_summary["enabled"] is False
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, stock)

    from safetensors.torch import load_file
    a = load_file(tmp_path / "stock" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * N_LAYERS
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_model_then_peft_trains(small_lm):
    model, ids = small_lm
    swap.quantize_model(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert sum(isinstance(m, swap.NF4Linear) for m in linears) == 7 * N_LAYERS
    assert type(model.lm_head) is nn.Linear  # skipped by name
    pm = swap.accelerate(_lora(model))
    assert pm.forge_rt_summary["accelerated"] == 7 * N_LAYERS
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)


def test_nf4linear_matches_dequantized_linear_and_moves():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = swap.NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 96)
    from forge_rt import nf4
    want = torch.nn.functional.linear(x, nf4.dequantize(q.nf4), lin.bias)
    assert torch.allclose(q(x), want, rtol=1e-5, atol=1e-5)
    q = q.to(torch.float64)  # dtype casts leave the packed bytes and fp32 absmax alone
    assert q.weight.dtype == torch.float64 and q.weight.shape == (40, 96)  # the logical weight
    assert q.nf4.packed.dtype == torch.uint8 and q.nf4.absmax_fp32().dtype == torch.float32
    assert q.nf4.packed.data_ptr() == q.weight.packed.data_ptr()
    moved = copy.deepcopy(q).to("meta")  # a device move takes the bytes along
    assert moved.weight.device.type == moved.nf4.packed.device.type == moved.nf4.absmax.device.type == "meta"
    with pytest.raises(ValueError, match="2-D"):
        swap.NF4Linear(nf4.quantize(torch.randn(64)))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def test_summary_counts_layers_kept_on_stock_path():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    # DoRA over a bitsandbytes base, and a LoRA layer over a full-precision base (head).
    tiny = _Tiny()
    for name in ("up", "down"):
        old = getattr(tiny, name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, compute_dtype=torch.float32, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        new.bias = old.bias
        setattr(tiny, name, new.to("cpu"))
    tiny.is_loaded_in_4bit = True
    dora = peft.get_peft_model(tiny, peft.LoraConfig(r=4, target_modules=["up", "head"], use_dora=True))
    ref = dora(x)
    swap.accelerate(dora)
    assert dora.forge_rt_summary["accelerated"] == 0
    assert dora.forge_rt_summary["skipped"] == {"DoRA": 1, "base layer is not 4-bit (Linear)": 1}
    assert torch.equal(dora(x), ref)

    # Two active adapters, and a non-LoRA adapter (IA3).
    two = peft.get_peft_model(swap.quantize_model(_Tiny(), skip=("head",)), peft.LoraConfig(r=4, target_modules=["up"]))
    two.add_adapter("second", peft.LoraConfig(r=4, target_modules=["up"]))
    two.base_model.set_adapter(["default", "second"])
    swap.accelerate(two)
    assert two.forge_rt_summary["skipped"] == {"multiple active adapters": 1}
    ia3 = peft.get_peft_model(swap.quantize_model(_Tiny()), peft.IA3Config(target_modules=["up"], feedforward_modules=[]))
    swap.accelerate(ia3)
    assert list(ia3.forge_rt_summary["skipped"]) == ["non-LoRA adapter (Linear)"]


def test_fused_forward_passes_dropout_in_training_only(monkeypatch):
    seen = []
    real = fused_peft.qlora_linear

    def spy(*args, **kwargs):
        if args[2] is not None:  # a LoRA call (NF4Linear's own base calls pass no adapter)
            seen.append(kwargs["dropout"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_peft, "qlora_linear", spy)
    pm = peft.get_peft_model(swap.quantize_model(_Tiny(), skip=("head",)),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up"], lora_dropout=0.25))
    swap.accelerate(pm)
    x = torch.randn(4, 64)
    pm.train()
    pm(x)
    pm.eval()
    pm(x)
    with pm.disable_adapter():  # disabled adapters: stock path, base layer only
        pm(x)
    assert seen == [0.25, 0.0]
