"""The RSS cap (forge_rt.pager.heap.RssCap): it gives glibc's retained free heap back when RSS is over the
cap, measured by the kernel's own RSS count; it moves up instead of trimming in vain when live memory is
over; and its hooks check at every decoder layer in forward and in backward, with and without checkpointing."""
import json
import subprocess
import sys

import pytest
import torch

from forge_rt.pager import heap

glibc = pytest.mark.skipif(not heap.RssCap(0).available, reason="malloc_trim is glibc's; elsewhere the cap is off")
MiB = 1 << 20


FRAGMENT = """
import ctypes, ctypes.util, json, torch
from forge_rt.pager import heap
MiB = 1 << 20
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallopt(-3, 32 * MiB)  # M_MMAP_THRESHOLD
libc.mallopt(-1, 64 * MiB)  # M_TRIM_THRESHOLD
start = heap.resident_bytes()
big, small = [], []
for _ in range(80):
    big.append(torch.ones(640 * 1024))  # 2.5 MiB
    small.append(torch.ones(50_000))
del big
before = heap.resident_bytes()
cap = heap.RssCap(before - 100 * MiB)
cap.check()
print(json.dumps([start, before, heap.resident_bytes(), cap.trims, len(small)]))
"""


@glibc
def test_trim_gives_retained_heap_back():
    """In a fresh process: 2.5 MiB blocks freed between live 200 KB ones, with glibc's mmap and trim thresholds
    where its dynamic ones end up after a training step's first big frees (32 and 64 MiB: such blocks then
    come from the heap, and a free top under 64 MiB is kept), leave ~200 MiB free but resident."""
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True).stdout
    start, before, after, trims, kept = json.loads(out.strip().splitlines()[-1])
    assert before > start + 150 * MiB  # glibc kept the freed blocks
    assert trims == 1 and after < before - 150 * MiB, (before / MiB, after / MiB)
    assert kept == 80


@glibc
def test_cap_moves_up_when_live_memory_is_over_it():
    live = torch.ones(64 * MiB)  # 256 MiB really in use
    live.fill_(2.0)
    cap = heap.RssCap(1)
    cap.check()
    assert cap.trims == 1 and cap.cap >= heap.resident_bytes()  # raised to what stayed, plus the margin
    cap.check()
    assert cap.trims == 1  # no second trim for nothing
    assert float(live[0]) == 2.0


class Counting(heap.RssCap):
    def __init__(self):
        super().__init__(1 << 62)
        self.calls = 0

    def check(self):
        self.calls += 1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hooks_check_at_every_layer_in_forward_and_backward(checkpointing):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    cap = Counting()
    layers = [m for m in model.modules() if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer)]
    handles = cap.watch(layers)
    ids = torch.randint(0, 64, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    forward = cap.calls
    loss.backward()
    backward = cap.calls - forward
    assert len(layers) == 3 and forward == len(layers)  # before each layer's forward
    # Before each layer's backward (the hook on its output's gradient); checkpointing's recomputation runs
    # inside the layer's call and does not pass the pre-hook again. Without the gradient hooks this is 0.
    assert backward == len(layers), (forward, backward)
    for h in handles:
        h.remove()
    cap.calls = 0
    model(input_ids=ids, labels=ids).loss.backward()
    assert cap.calls == 0
