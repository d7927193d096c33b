"""Per-example LoRA gradients and norms (forge_rt.privacy.grads) against a naive reference: each example run
alone through the model, HF's own loss, autograd (fp32, 1e-5). Over forge_rt's fused NF4 path and stock
PEFT, with gradient checkpointing of both kinds, activation paging, and the chunked LM-head loss."""
import contextlib

import pytest
import torch

import forge_rt
from forge_rt.privacy import DPError, PerExampleGrads, example_losses
from forge_rt.testing import rel_err

from dp_models import batch, naive_per_example, tiny_lora

TOL = 1e-5


def _tapped(model, b, chunked=False, paging=False):
    grads = PerExampleGrads(model)
    ctx = forge_rt.paging() if paging else contextlib.nullcontext()
    with ctx:
        example_losses(model, **b, chunked=chunked).sum().backward()
    return grads


def _check_against_naive(model, grads, ref):
    by_name = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_param = {}
    for la in grads.layers:
        for which, t in (("A", la.dA), ("B", la.dB)):
            name = next(n for n, p in by_name.items() if p is (la.A if which == "A" else la.B))
            per_param[name] = t
    assert per_param.keys() == ref[0].keys()
    for i, r in enumerate(ref):
        for name, g in r.items():
            assert rel_err(per_param[name][i], g) < TOL, (i, name)
    naive_norms = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in r.values())) for r in ref])
    assert rel_err(grads.squared_norms().sqrt(), naive_norms) < TOL


SETUPS = {
    "fused": dict(fused=True),
    "stock": dict(fused=False),
    "fused-checkpoint": dict(fused=True, ckpt=False),
    "fused-checkpoint-reentrant": dict(fused=True, ckpt=True),
    "fused-paging": dict(fused=True, paging=True),
    "fused-chunked-loss": dict(fused=True, chunked=True),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_per_example_grads_equal_naive_reference(setup):
    kw = SETUPS[setup]
    model = tiny_lora(fused=kw["fused"])
    b = batch()
    ref = naive_per_example(model, b)
    if "ckpt" in kw:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": kw["ckpt"]})
        model.enable_input_require_grads()
    hooked_before = forge_rt.nn.peft.stock_calls["module hooks"]  # a process-wide count: earlier tests add to it
    grads = _tapped(model, b, chunked=kw.get("chunked", False), paging=kw.get("paging", False))
    _check_against_naive(model, grads, ref)
    if kw["fused"]:
        assert forge_rt.nn.peft.stock_calls["module hooks"] == hooked_before, "the taps pushed layers off the fused path"


def test_example_losses_equal_each_example_alone():
    model = tiny_lora()
    b = batch()
    with torch.no_grad():
        got = example_losses(model, **b)
        chunked = example_losses(model, **b, chunked=True)
        alone = torch.stack([model(input_ids=b["input_ids"][i:i + 1, :n], labels=b["labels"][i:i + 1, :n]).loss
                             for i, n in enumerate(b["attention_mask"].sum(1).tolist())])
    assert rel_err(got, alone) < TOL and rel_err(chunked, alone) < TOL


def test_remove_restores_the_model_and_refusals():
    model = tiny_lora()
    grads = PerExampleGrads(model)
    grads.remove()
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(DPError, match="LoRA dropout 0.1"):
        PerExampleGrads(tiny_lora(dropout=0.1))
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(DPError, match="outside LoRA A/B: .*lm_head"):
        PerExampleGrads(model)
    with pytest.raises(DPError, match="no labelled token"):
        b = batch()
        b["labels"][1] = -100
        example_losses(tiny_lora(), **b)


def test_tapped_output_may_be_modified_in_place():
    model = tiny_lora()
    grads = PerExampleGrads(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = layer(x)
    y.mul_(2.0)  # a view returned by the tap node would refuse this
    y.sum().backward()
    assert grads.layers[[la.name for la in grads.layers].index("base_model.model.model.layers.0.mlp.up_proj")].dA.shape == (2, 4, 64)
