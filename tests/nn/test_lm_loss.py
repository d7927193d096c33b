"""forge_rt.nn.lm_loss vs the stock Hugging Face loss (model(**batch).loss, full logits) on tiny random
Llama / Qwen2 / Gemma 2 (final-logit softcapping) models, plain and PEFT LoRA-wrapped: same loss, same
gradients; and the opt-in patch of model.forward (round trip, generate, deepcopy, torch.save)."""
import copy
import io

import pytest
import torch

from forge_rt.nn.lm_loss import causal_lm_loss, patch_causal_lm_loss
from forge_rt.testing import lora_model, rel_err as rel

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 301
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_model(kind: str, **config):
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **config)).eval()
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **config)).eval()
    if kind == "gemma2":  # a small cap, so the tanh is far from linear on these logits
        cfg = transformers.Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=0.5, **config)
        return transformers.Gemma2ForCausalLM(cfg).eval()
    raise ValueError(kind)


def lora(model):
    # random B (init_lora_weights=False): every LoRA grad is non-zero
    return lora_model(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), init_lora_weights=False)


def batch():
    """Two rows, the second right-padded; prompt and padding positions unlabelled (as in SFT)."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[attention_mask == 0] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def grads(model, loss):
    """{name: grad} of the trainable parameters; grads are cleared afterwards."""
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(ours, stock):
    assert ours.keys() == stock.keys() and ours
    for name in stock:
        assert rel(ours[name], stock[name]) <= 1e-5, (name, rel(ours[name], stock[name]))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_loss_and_all_grads_match_stock(kind):
    """Full fine-tuning with tied embeddings (Gemma 2, and Llama here) or not (Qwen2): the head's weight
    gets its grad through the fused op."""
    model = tiny_model(kind, **({"tie_word_embeddings": True} if kind == "llama" else {}))
    b = batch()
    stock = model(**b).loss
    ours = causal_lm_loss(model, **b)
    assert ours.dtype == torch.float32 and rel(ours, stock) <= 1e-5
    assert_same_grads(grads(model, ours), grads(model, model(**b).loss))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lora_grads_match_stock(kind):
    model = lora(tiny_model(kind))
    model.train()  # LoRA dropout is 0: train mode is still deterministic
    b = batch()
    ours = causal_lm_loss(model, **b)
    stock = model(**b).loss
    assert rel(ours, stock) <= 1e-5
    ours_g, stock_g = grads(model, ours), grads(model, model(**b).loss)
    assert all("lora_" in n for n in ours_g)
    assert_same_grads(ours_g, stock_g)


def test_lora_model_without_peft_model_wrapper():
    model = lora(tiny_model("llama"))
    b = batch()
    assert rel(causal_lm_loss(model.base_model, **b), model(**b).loss) <= 1e-5


def test_num_items_in_batch_sums_then_divides():
    """Trainer's gradient-accumulation form: sum over the labelled tokens / num_items_in_batch."""
    model = tiny_model("llama")
    b = batch()
    for n in (torch.tensor(40), 40):
        assert rel(causal_lm_loss(model, **b, num_items_in_batch=n), model(**b, num_items_in_batch=n).loss) <= 1e-5


def test_shift_labels_and_all_ignored():
    model = tiny_model("llama")
    b = batch()
    shift = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:]
    with_shift = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], shift_labels=shift)
    assert rel(causal_lm_loss(model, **with_shift), model(**b).loss) <= 1e-5
    none = dict(b, labels=torch.full_like(b["labels"], -100))
    assert model(**none).loss.isnan() and causal_lm_loss(model, **none).isnan()  # torch's mean over nothing


def test_patch_round_trip_and_generate():
    model = lora(tiny_model("llama"))
    b = batch()
    stock = model(**b)
    prompt = dict(input_ids=b["input_ids"][:1, :6], attention_mask=b["attention_mask"][:1, :6])
    stock_logits = model(**prompt).logits
    stock_text = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    hf_class = type(model.get_base_model())

    assert patch_causal_lm_loss(model) is model
    patch_causal_lm_loss(model)  # idempotent
    patched = type(model.get_base_model())
    assert patched.__bases__ == (hf_class,) and patched.__name__ == hf_class.__name__
    assert "forward" not in vars(model.get_base_model())  # nothing stored on the instance
    out = model(**b)
    assert out.logits is None and rel(out.loss, stock.loss) <= 1e-5
    assert model(**b, return_dict=False)[0] == out.loss
    assert torch.equal(model(**prompt).logits, stock_logits)  # no labels: the stock forward
    assert torch.equal(model.generate(**prompt, max_new_tokens=4, do_sample=False), stock_text)

    patch_causal_lm_loss(model, enable=False)
    assert type(model.get_base_model()) is hf_class
    assert torch.equal(model(**b).logits, stock.logits)


def test_patched_model_survives_deepcopy_and_torch_save():
    model = patch_causal_lm_loss(lora(tiny_model("qwen2")))
    b = batch()
    loss = model(**b).loss
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        out = clone(**b)
        assert out.logits is None and torch.equal(out.loss, loss)
        assert isinstance(clone.get_base_model(), transformers.Qwen2ForCausalLM)
        patch_causal_lm_loss(clone, enable=False)
        assert type(clone.get_base_model()) is transformers.Qwen2ForCausalLM
    assert model(**b).logits is None  # the copies were unpatched, not the original


def test_refuses_heads_it_cannot_reproduce():
    with_head_lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="plain nn.Linear"):
        causal_lm_loss(with_head_lora, **batch())
    prompt_tuning = peft.get_peft_model(tiny_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                      num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning"):
        patch_causal_lm_loss(prompt_tuning)
    rescaled = tiny_model("llama")
    rescaled.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="rescales its logits"):
        causal_lm_loss(rescaled, **batch())


def test_accelerate_chunked_loss_is_opt_in_and_exact():
    """accelerate(model, chunked_loss=True) on a quantized LoRA model: same loss and LoRA grads as the
    fused path with full logits; logits are None only then; accelerate(enable=False) restores them."""
    import forge_rt
    model = forge_rt.quantize_model(tiny_model("llama"))
    pm = lora(model)
    b = batch()
    forge_rt.accelerate(pm)
    full = pm(**b)
    assert full.logits is not None
    stock_g = grads(pm, full.loss)
    forge_rt.accelerate(pm, chunked_loss=True)
    out = pm(**b)
    assert out.logits is None and rel(out.loss, full.loss) <= 1e-5
    assert_same_grads(grads(pm, out.loss), stock_g)
    forge_rt.accelerate(pm, enable=False)
    assert pm(**b).logits is not None
