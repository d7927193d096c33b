"""The step's FLOP floor (plan.choose.step_floor_seconds) against torch's own count of the matmul FLOPs of a
real LoRA step (torch.utils.flop_counter on stock PEFT over a tiny fp32 Llama: frozen base, every token labelled),
with and without recomputation."""
import pytest
import torch

from forge_rt.plan.choose import step_floor_seconds
from forge_rt.plan.estimate import Shapes


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    # eager attention: torch's counter does not see the CPU sdpa kernel's FLOPs
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def _counted_flops(checkpointing: bool, batch: int, seq: int, r: int) -> int:
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    model = _model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    pm = get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    pm.train()
    ids = torch.randint(0, 512, (batch, seq))
    with FlopCounterMode(display=False) as fc:
        pm(input_ids=ids, labels=ids).loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_floor_counts_the_flops_torch_counts(checkpointing):
    batch, seq, r = 2, 48, 8
    shapes = Shapes.from_config(_model().config)
    ours = step_floor_seconds(shapes, batch, seq, {"flops": 1.0}, checkpointing=checkpointing, labelled_fraction=1.0,
                              lora_r=r)
    torch_count = _counted_flops(checkpointing, batch, seq, r)
    # Within 3%: the floor also counts the input gradients of the first layer, which autograd skips.
    assert ours == pytest.approx(torch_count, rel=0.03), (ours, torch_count)


def test_the_head_counts_only_labelled_rows():
    shapes = Shapes.from_config(_model().config)
    full = step_floor_seconds(shapes, 2, 48, {"flops": 1.0}, checkpointing=False, labelled_fraction=1.0, lora_r=8)
    quarter = step_floor_seconds(shapes, 2, 48, {"flops": 1.0}, checkpointing=False, labelled_fraction=0.25, lora_r=8)
    head = 2 * shapes.vocab * shapes.hidden * 2 * 48
    assert full - quarter == pytest.approx(2 * head * 0.75)
