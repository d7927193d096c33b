"""The memory planner and what it composes: the chunked loss gives the loss curve of stock PEFT over the
dequantized NF4 weights, the activation model matches saved-tensor counts, the modes choose as documented,
checkpointing composes with the pager (layer inputs spilled, gradients bit-identical), and the
`python -m forge_rt.plan` command answers from a config alone."""
import subprocess
import sys

import pytest
import torch

import forge_rt
from forge_rt.nn.lm_loss import causal_lm_loss
from forge_rt.plan import Shapes, estimate, plan
from forge_rt.plan.estimate import SizeError, parse_bytes, saved_floats_per_token
from forge_rt.testing import dense_twin, lora_model

transformers = pytest.importorskip("transformers")

RATES = {"flops": 1e11, "codec": 4e8, "disk": 1e9}


def tiny(kind="llama", **kw):
    torch.manual_seed(0)
    cfg = {**dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2), **kw}
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def batch(n=3, t=24, vocab=512):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = -100  # a prompt: only the response carries labels
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_losses(chunked: bool, steps: int = 4) -> list[float]:
    model = forge_rt.quantize_model(tiny())
    if not chunked:  # stock PEFT and transformers' loss over plain nn.Linear layers holding the dequantized NF4
        model = dense_twin(model)
    torch.manual_seed(2)  # the same LoRA init on both sides
    model = lora_model(model, r=4, alpha=8, init_lora_weights=False)
    if chunked:
        forge_rt.accelerate(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        b = batch(t=20 + step)
        loss = causal_lm_loss(model, **b) if chunked else model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_loss_curve_equals_stock_peft_over_the_dequantized_weights():
    ours, stock = train_losses(True), train_losses(False)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(ours, stock)), (ours, stock)


def _saved_floats(model, b) -> float:
    seen = {}

    def pack(t):
        if not (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model.model.model(input_ids=b["input_ids"])
    return sum(seen.values()) / 4


@pytest.mark.parametrize("kind,hidden,inter,heads,kv", [("llama", 64, 160, 4, 2), ("llama", 96, 128, 6, 6),
                                                         ("qwen2", 64, 160, 4, 2)])
def test_activation_model_matches_saved_tensor_counts(kind, hidden, inter, heads, kv):
    """The planner's per-token, per-layer saved floats against a fresh count of what autograd saves in
    the fused path (an independent measurement, not the fit's own data points)."""
    model = forge_rt.quantize_model(tiny(kind, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                         num_key_value_heads=kv))
    pm = lora_model(model, r=8)
    forge_rt.accelerate(pm)
    b = batch(n=2, t=32)
    measured = _saved_floats(pm, b) / (2 * 32) / 2
    sh = Shapes.from_config(model.config)
    predicted = saved_floats_per_token(sh.hidden, sh.intermediate, sh.kv_dim, 8, 7)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_modes_choose_as_documented():
    sh = Shapes(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, tied=True)
    speed = plan(sh, 8, 144, "speed", rates=RATES, labelled_fraction=0.24)
    mn = plan(sh, 8, 144, "min", rates=RATES, labelled_fraction=0.24)
    assert not speed.checkpointing and mn.checkpointing and mn.predicted_peak < speed.predicted_peak
    assert speed.chunked_loss and mn.chunked_loss and speed.spill_budget is None
    fits = plan(sh, 8, 144, "auto", budget=speed.predicted_peak + (1 << 20), rates=RATES, labelled_fraction=0.24)
    assert not fits.checkpointing and "fits" in fits.reason
    tight = plan(sh, 8, 144, "auto", budget=mn.predicted_peak + (1 << 20), rates=RATES, labelled_fraction=0.24)
    assert tight.checkpointing and tight.spill_budget is None
    over = plan(sh, 1, 8192, "min", budget=mn.predicted_peak, rates=RATES)
    assert over.spill_budget is not None and "spill" in over.reason
    # speed never recomputes: over its budget it spills, and says when even that does not fit
    fast_over = plan(sh, 8, 144, "speed", budget=mn.predicted_peak + (1 << 20), rates=RATES, labelled_fraction=0.24)
    assert not fast_over.checkpointing and fast_over.spill_budget is not None and "spill" in fast_over.reason
    assert fast_over.predicted_peak < speed.predicted_peak
    with pytest.raises(ValueError, match="memory mode"):
        plan(sh, 8, 144, "fast", rates=RATES)


@pytest.mark.parametrize("mode", ["auto", "speed", "min"])
@pytest.mark.parametrize("budget_gib", [1.6, 1.8, 2.0])
def test_a_spilled_plan_fits_its_budget_with_the_largest_spill(mode, budget_gib):
    """Over budget a plan spills; its prediction (the estimate itself) is within the budget, and one MiB more
    kept in memory would not be: the spill room counts every term the estimate adds back."""
    sh = Shapes(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, tied=True)
    budget = int(budget_gib * 2**30)
    p = plan(sh, 1, 8192, mode, budget=budget, rates=RATES)
    assert p.spill_budget is not None and "spill" in p.reason and "exceeds" not in p.reason, p.reason
    assert p.predicted_peak <= budget, (p.predicted_peak / 2**30, p.reason)

    def peak(spill):
        return estimate(sh, 1, 8192, checkpointing=p.checkpointing, chunked_loss=True, spill_budget=spill).total
    assert peak(p.spill_budget) == p.predicted_peak and peak(p.spill_budget + (1 << 20)) > budget
    # Below the floor (runtime, weights, the layer in backward, logits, workspace) it says it does not fit.
    floor = peak(0)
    under = plan(sh, 1, 8192, mode, budget=floor - 1, rates=RATES)
    assert under.spill_budget == 0 and under.predicted_peak == floor and "still exceeds the budget" in under.reason


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (parameters and leaves excluded)."""
    seen = {}

    def pack(t):
        if not (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_chunked_loss_is_what_shrinks_long_context():
    """Measured on a tiny model with a wide vocabulary (2 x 256 tokens, half labelled): the stock loss keeps
    the full logits for backward (what the planner's stock logits part must cover), the chunked loss a small
    fraction of them; at SmolLM2's shape and 8192 tokens the planner predicts the same shrinking."""
    vocab, n, t = 8192, 2, 256
    model = lora_model(forge_rt.quantize_model(tiny(vocab_size=vocab, num_hidden_layers=1)), r=4)
    forge_rt.accelerate(model)
    b = batch(n=n, t=t, vocab=vocab)

    def stock():  # transformers' loss: cross-entropy over every position's fp32 logits
        logits = model(input_ids=b["input_ids"]).logits.float()
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), b["labels"][:, 1:].reshape(-1))
    kept = _saved_bytes(stock) - _saved_bytes(lambda: causal_lm_loss(model, **b))
    sh = Shapes.from_config(model.config)
    est = {c: estimate(sh, n, t, checkpointing=False, chunked_loss=c, labelled_fraction=0.5).parts["logits"]
           for c in (False, True)}
    assert n * t * vocab * 4 <= kept <= est[False] - est[True], (kept, est)
    sh = Shapes(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, tied=True)
    full = estimate(sh, 1, 8192, checkpointing=True, chunked_loss=False)
    chunked = estimate(sh, 1, 8192, checkpointing=True, chunked_loss=True)
    assert chunked.parts["logits"] < full.parts["logits"] / 20


def test_sizes_parse_or_say_how():
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2G") == 2 << 30 and parse_bytes("1.5GiB") == 3 << 29
    with pytest.raises(SizeError, match="memory_budget 'lots' is not a size; use e.g. 512M or 2G"):
        parse_bytes("lots", "memory_budget")


def test_checkpointing_composes_with_the_pager(tmp_path):
    """Reentrant checkpointing saves each layer's input with save_for_backward, so a spill pager sees and
    spills it; the LoRA gradients stay bit-identical to checkpointing without paging."""
    def run(paging: bool):
        model = forge_rt.quantize_model(tiny(num_hidden_layers=3))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        pm = lora_model(model, r=4, init_lora_weights=False)
        forge_rt.accelerate(pm)
        pm.train()
        b = batch(n=2, t=64)
        if paging:
            with forge_rt.paging(budget_bytes=0, spill_dir=tmp_path, min_bytes=1024) as pager:
                causal_lm_loss(pm, **b).backward()
                stats = dict(pager.stats())
        else:
            causal_lm_loss(pm, **b).backward()
            stats = None
        return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}, stats
    plain, _ = run(False)
    paged, stats = run(True)
    assert stats["bytes_spilled"] > 0
    assert plain.keys() == paged.keys() and all(torch.equal(plain[n], paged[n]) for n in plain)


def test_plan_command_answers_from_a_config(tmp_path, capsys):
    from forge_rt.cli.plan import main
    tiny().config.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "forge_rt.plan", "--model", str(tmp_path / "config.json"),
                          "--seq-len", "256", "--budget", "1G"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert all(mode in out.stdout for mode in ("auto", "speed", "min")) and "fits" in out.stdout
    assert main(["--model", str(tmp_path / "nope")]) == 2  # in-process: a second interpreter start costs ~4 s
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
