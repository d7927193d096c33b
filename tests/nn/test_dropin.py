"""forge_rt.accelerate as a drop-in under other people's PEFT code: each scenario runs on a stock PEFT model
and on an accelerated deep copy of it, over tiny random Llama / Qwen2 / Mistral / Phi3 / Gemma models,
and must give the same logits and LoRA gradients (1e-5 relative, fp32) or count the layer as taking the
stock path. The oracle is stock PEFT over a dense twin: plain nn.Linear layers holding the dequantized NF4
weights, so a bug in the 4-bit base path cannot cancel out (over bitsandbytes, bitsandbytes' own forward)."""
import copy
import io

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import forge_rt.nn as swap  # noqa: E402
from forge_rt.nn import peft as fused_peft  # noqa: E402
from forge_rt.testing import dense_twin, rel_err  # noqa: E402

TOL = 1e-5
FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma")


def _tiny(family: str, n_layers: int = 1) -> nn.Module:
    """A random fp32 causal LM of `family` with hidden 64 (NF4 blocks of 64 fit every linear)."""
    cfg_cls = transformers.AutoConfig.for_model(family).__class__
    cfg = cfg_cls(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(1, 96, (2, n), generator=torch.Generator().manual_seed(1))


def _randomize_b(pm) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so the LoRA term (and grad A) is exercised
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _peft(model, **kw):
    kw.setdefault("lora_dropout", 0.0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw))
    _randomize_b(pm)
    return pm


def _step(pm, ids):
    pm.zero_grad()
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert rel_err(la, lb) < TOL
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert rel_err(ga[name], gb[name]) < TOL, name


def _pair(family, **kw):
    """(stock PEFT over the dense twin of quantize_model's NF4 model, accelerated PEFT over the NF4 model, both
    with the same LoRA init) and the number of accelerated LoRA layers."""
    model = swap.quantize_model(_tiny(family))
    twin = dense_twin(model)
    torch.manual_seed(5)
    stock = _peft(twin, **kw)
    torch.manual_seed(5)
    fused = swap.accelerate(_peft(model, **kw))
    return stock, fused, fused.forge_rt_summary["accelerated"]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_matches_stock_peft(family):
    stock, fused, n = _pair(family, use_rslora=True)
    assert n >= 4 and fused.forge_rt_summary["skipped"] == {}
    ids = _ids()
    _assert_same(_step(fused, ids), _step(stock, ids))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_gradient_checkpointing_and_generate(family):
    stock, fused, _ = _pair(family)
    ids = _ids()
    for pm in (stock, fused):
        pm.train()
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same(_step(fused, ids), _step(stock, ids))
    for pm in (stock, fused):
        pm.eval()
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fused.generate(input_ids=ids, **kw), stock.generate(input_ids=ids, **kw))


def test_several_adapters_set_disable_weighted_and_dropout():
    stock, fused, _ = _pair("llama", lora_dropout=0.1)  # dropout is off in eval mode, where both run
    for pm in (stock, fused):
        torch.manual_seed(2)  # the same random lora_A in both
        pm.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        _randomize_b(pm)
        pm.add_weighted_adapter(["default", "other"], [0.7, 0.3], "mix", combination_type="linear")
        pm.eval()
    ids = _ids()
    for name in ("other", "mix", "default"):
        for pm in (stock, fused):
            pm.set_adapter(name)
        _assert_same(_step(fused, ids), _step(stock, ids))
    before = sum(fused_peft.stock_calls.values())
    with torch.no_grad(), stock.disable_adapter(), fused.disable_adapter():
        assert rel_err(fused(input_ids=ids).logits, stock(input_ids=ids).logits) < TOL
    assert fused_peft.stock_calls["adapters disabled"] > 0 and sum(fused_peft.stock_calls.values()) > before


def test_save_load_and_modules_to_save(tmp_path):
    stock, fused, _ = _pair("qwen2", modules_to_save=["lm_head"])
    ids = _ids()
    _assert_same(_step(fused, ids), _step(stock, ids))
    fused.save_pretrained(tmp_path)
    base = swap.quantize_model(_tiny("qwen2"))
    loaded = swap.accelerate(peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True))
    assert loaded.forge_rt_summary["accelerated"] == fused.forge_rt_summary["accelerated"]
    _assert_same(_step(loaded, ids), _step(stock, ids))


def test_pickle_and_deepcopy_keep_the_fused_path():
    stock, fused, n = _pair("mistral")
    ids = _ids()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for clone in (torch.load(buf, weights_only=False), copy.deepcopy(fused)):
        assert sum(fused_peft.is_fused(m) for m in clone.modules()) == n
        _assert_same(_step(clone, ids), _step(stock, ids))
    swap.accelerate(fused, enable=False)
    assert not any(fused_peft.is_fused(m) for m in fused.modules())


def test_hooks_take_the_stock_path_and_run():
    stock, fused, _ = _pair("gemma")
    ids = _ids()

    def double(module, args, out):
        return out * 2

    for pm in (stock, fused):
        q = pm.base_model.model.model.layers[0].self_attn.q_proj
        q.base_layer.register_forward_hook(double)
        q.lora_A["default"].register_forward_pre_hook(lambda m, a: None)
        pm.base_model.model.model.layers[0].self_attn.k_proj.lora_B["default"]._hf_hook = None  # accelerate's
    before = fused_peft.stock_calls["module hooks"]
    _assert_same(_step(fused, ids), _step(stock, ids))
    assert fused_peft.stock_calls["module hooks"] == before + 2  # q_proj and k_proj; the rest stay fused


def test_hf_trainer_matches_stock_peft(tmp_path):
    ids = _ids(16)
    data = [{"input_ids": row, "labels": row} for row in ids.repeat(4, 1)]
    stock, fused, _ = _pair("llama")
    losses = []
    for pm in (stock, fused):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                              learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                              use_cpu=True, seed=0, data_seed=0)
        trainer = transformers.Trainer(model=pm, args=args, train_dataset=data)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3
    for a, b in zip(*losses):
        assert abs(a - b) <= TOL * abs(b)


def test_prepare_model_for_kbit_training_and_conv1d_warning(caplog):
    model = swap.quantize_model(_tiny("llama"))
    model = peft.prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing  # PEFT enables it for 4-bit models
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=96))
    with pytest.warns(UserWarning, match="Conv1D"):
        swap.quantize_model(gpt2)


def _bnb_model(family: str, nested: bool):
    """The tiny model with every linear but lm_head a bitsandbytes Linear4bit (NF4, blocks of 64) that
    bitsandbytes quantizes itself."""
    bnb = pytest.importorskip("bitsandbytes")
    model = _tiny(family)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name != "lm_head":
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    compute_dtype=torch.float32, compress_statistics=nested, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                           compress_statistics=nested, blocksize=64)
            new.bias = mod.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new.to("cpu"))
    model.is_loaded_in_4bit = True
    return model


def _linear4bit(pm):
    import bitsandbytes as bnb
    return [m for m in pm.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_cpu_packed_layout_is_read_back_exactly():
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    layer = _linear4bit(_bnb_model("llama", nested=False))[0]
    plain = layer.weight.data.clone().view(-1)
    absmax = layer.weight.quant_state.absmax.clone()
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    w = fused_peft._nf4_of(layer)
    assert torch.equal(w.packed, plain)  # bitsandbytes' own bytes before it repacked them
    assert torch.equal(w.absmax, absmax.to(torch.bfloat16).float())  # what its CPU kernel reads


def test_unreadable_bitsandbytes_layout_takes_the_stock_path():
    pm = _peft(_bnb_model("llama", nested=False))
    swap.accelerate(pm)
    layer = _linear4bit(pm)[0]
    layer.weight.quant_state.shape = torch.Size((7, 3))  # a state whose sizes don't match the bytes
    before = fused_peft.stock_calls["bitsandbytes layout not readable as NF4"]
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # nor can bitsandbytes
        pm(input_ids=_ids())
    assert fused_peft.stock_calls["bitsandbytes layout not readable as NF4"] == before + 1


@pytest.mark.parametrize("nested", [False, True])
def test_trigger_sequence_over_bitsandbytes(nested):
    """Eval + no-grad stock forward on an AVX512-BF16 CPU (forced here) repacks every weight in place;
    then accelerate and a training step. The oracle: stock PEFT on a copy that bitsandbytes unpacks again
    (exactly, without double quantization; with it, bitsandbytes re-quantizes the bf16 absmax)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    pm = _peft(_bnb_model("qwen2", nested))
    ids = _ids()
    for layer in _linear4bit(pm):
        layer.support_avx512bf16_for_cpu = True
    pm.eval()
    with torch.no_grad():
        pm(input_ids=ids)
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in _linear4bit(pm))
    oracle = copy.deepcopy(pm)
    for layer in _linear4bit(oracle):
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            layer.weight.data, layer.weight.quant_state)
        qs = layer.weight.quant_state
        if not nested:  # bitsandbytes 0.50's inverse leaves this absmax in its CPU form: bf16 [K/64, N]
            qs.absmax = qs.absmax.T.reshape(-1).float()
        layer.support_avx512bf16_for_cpu = False
    swap.accelerate(pm)
    assert pm.forge_rt_summary["skipped"] == {}
    pm.train()
    oracle.train()
    (logits, grads), (want, want_grads) = _step(pm, ids), _step(oracle, ids)
    tol = 2e-2 if nested else TOL
    assert rel_err(logits, want) < tol
    assert all(rel_err(grads[n], want_grads[n]) < 10 * tol for n in want_grads)


def test_merge_adapter_and_merge_and_unload_over_nf4():
    stock, fused, n = _pair("phi3")
    ids = _ids()
    with torch.no_grad():
        want = stock(input_ids=ids).logits
        fused.merge_adapter()
        assert rel_err(fused(input_ids=ids).logits, want) < 1e-5
        assert fused_peft.stock_calls["merged adapter"] >= n
        fused.unmerge_adapter()
        assert rel_err(fused(input_ids=ids).logits, want) < 1e-5
        merged = swap.accelerate(copy.deepcopy(fused), enable=False).merge_and_unload()  # PEFT merges into NF4Linear
        assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
        assert all(m.weight.dense is not None for m in merged.modules() if isinstance(m, swap.NF4Linear))
        assert rel_err(merged(input_ids=ids).logits, want) < 1e-4


@pytest.mark.parametrize("kw", [{"use_dora": True}, {"init_lora_weights": "olora"}], ids=["dora", "olora"])
def test_dora_and_olora_over_nf4_match_peft_over_dequantized_layers(kw):
    model = swap.quantize_model(_tiny("llama"))
    twin = dense_twin(model)
    torch.manual_seed(3)
    pm = _peft(model, **kw)
    torch.manual_seed(3)
    want = _peft(twin, **kw)
    swap.accelerate(pm)
    reason = "DoRA" if "use_dora" in kw else "NF4 weight made dense by an in-place write (OLoRA)"
    before = fused_peft.stock_calls[reason]
    ids = _ids()
    _assert_same(_step(pm, ids), _step(want, ids))
    assert pm.forge_rt_summary["skipped"].get("DoRA") or fused_peft.stock_calls[reason] > before


def test_torch_compile_accelerated_decoder_layer_is_one_graph():
    _, fused, _ = _pair("llama")
    fused.train()
    layer = fused.base_model.model.model.layers[0]
    hidden = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(8)[None].expand(2, 8)
    pe = fused.base_model.model.model.rotary_emb(hidden, pos)
    kw = dict(position_embeddings=pe, attention_mask=None, position_ids=pos)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(layer)(hidden, **kw)
    assert explain.graph_break_count == 0 and explain.graph_count == 1

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        fused.zero_grad()
        out = fn(h, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}, h.grad

    want = run(layer)
    got = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))  # AOTAutograd: fake impls + autograd
    _assert_same(got[:2], want[:2])
    assert rel_err(got[2], want[2]) < TOL
