"""The memory planner: which savings a run uses (checkpointing, the chunked loss, spilling saved
activations to disk), chosen from the model's shapes, the batch, a memory budget and the probed speed
of the machine. `plan(...)` returns the choice with its reasons, predicted peak and step time.

Modes: `speed` never recomputes; `min` always checkpoints (and spills when even that exceeds the
budget); `auto` takes the least memory among the plans within AUTO_SLACK of the fastest one, and
under a budget the fastest plan that fits. The chunked loss is always on: it is exact and saves time.
The LZ4 codec is not used for compress-only paging on a CPU: fp32 activations compress 1.16x at a cost
of a second and a half per step here (bench/results/NOTES.md, paging), so there it only pays as the disk tier's front."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from forge_rt.plan.estimate import Estimate, Shapes, estimate

# Checkpointing recomputes the decoder's forward, about a third of a step: auto accepts that price,
# because on the machines forge_rt is for (Orin, a shared server) memory runs out before patience.
AUTO_SLACK = 0.40
# Backward over forward time on the fused path (input gradients through NF4, LoRA gradients, attention
# and elementwise backward): measured by the suite: python -m forge_rt.bench --only memory.
BACKWARD_OVER_FORWARD = 2.5
MODES = ("auto", "speed", "min")


@dataclass
class Plan:
    mode: str
    checkpointing: bool
    chunked_loss: bool
    spill_budget: int | None
    predicted_peak: int
    predicted_step_s: float
    parts: dict
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def step_seconds(shapes: Shapes, batch: int, seq_len: int, rates: dict, *, checkpointing: bool,
                 chunked_loss: bool, labelled_fraction: float, est: Estimate, spill: bool) -> float:
    """Forward FLOPs over the probed matmul rate, times (1 + BACKWARD_OVER_FORWARD), plus the recomputed
    decoder forward when checkpointing, plus the spilled bytes through the codec and the disk."""
    tokens = batch * seq_len
    dec = 2 * shapes.linear_params() * tokens + 4 * shapes.layers * batch * seq_len ** 2 * shapes.hidden
    head_rows = tokens * (labelled_fraction if chunked_loss else 1.0)
    head = 2 * shapes.vocab * shapes.hidden * head_rows
    flops = (1 + BACKWARD_OVER_FORWARD) * (dec + head) + (dec if checkpointing else 0)
    seconds = flops / rates["flops"]
    if spill:
        per_s = [r for r in (rates.get("codec"), rates.get("disk")) if r]
        seconds += sum(2 * est.parts["activations"] / r for r in per_s)
    return seconds


def step_floor_seconds(shapes: Shapes, batch: int, seq_len: int, rates: dict, *, checkpointing: bool,
                       labelled_fraction: float, lora_r: int) -> float:
    """The least a LoRA step can take on this machine: its matmul FLOPs at the probed fp32 GEMM rate, nothing
    else (no elementwise work, no dequantization, no overhead). Forward through the frozen base, input
    gradients through it (as many FLOPs again; no weight gradients), attention backward (twice its forward),
    the LoRA products and their four backward products (twice the forward), the LM head on labelled rows only
    (forward and input gradient), and the decoder's forward again when checkpointing recomputes it. Checked
    against torch.utils.flop_counter on a real step (tests/plan/test_step_floor.py)."""
    tokens = batch * seq_len
    linears = 2 * shapes.linear_params() * tokens
    attention = 4 * shapes.layers * batch * seq_len ** 2 * shapes.hidden
    lora = 2 * lora_r * sum(i + o for i, o in shapes.linear_shapes()) * shapes.layers * tokens
    head = 2 * shapes.vocab * shapes.hidden * tokens * labelled_fraction
    recompute = linears + attention + lora if checkpointing else 0
    flops = 2 * linears + 3 * attention + 3 * lora + 2 * head + recompute
    return flops / rates["flops"]


def _candidate(shapes, batch, seq_len, rates, labelled, lora_r, device, ckpt, spill_budget) -> Plan:
    est = estimate(shapes, batch, seq_len, checkpointing=ckpt, chunked_loss=True, labelled_fraction=labelled,
                   lora_r=lora_r, device=device, spill_budget=spill_budget)
    secs = step_seconds(shapes, batch, seq_len, rates, checkpointing=ckpt, chunked_loss=True,
                        labelled_fraction=labelled, est=est, spill=spill_budget is not None)
    return Plan("", ckpt, True, spill_budget, est.total, secs, est.parts, "")


def _largest_spill(args: tuple, ckpt: bool, budget: int) -> int:
    """The largest spill budget whose predicted peak stays within `budget` (0 when none does). Searched over
    `estimate` itself, which grows with the spill budget, so the room includes every term it adds back (the
    layer running backward stays in memory on top of the spill budget)."""
    lo, hi = 0, _candidate(*args, ckpt, None).parts["activations"]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _candidate(*args, ckpt, mid).predicted_peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(shapes: Shapes, batch: int, seq_len: int, mode: str = "auto", budget: int | None = None, *,
         rates: dict, labelled_fraction: float = 1.0, lora_r: int = 16, device: str = "cpu") -> Plan:
    if mode not in MODES:
        raise ValueError(f"memory mode {mode!r}: use one of {', '.join(MODES)}")
    args = (shapes, batch, seq_len, rates, labelled_fraction, lora_r, device)
    fast, ckpt = _candidate(*args, False, None), _candidate(*args, True, None)
    if mode == "speed":
        chosen, why = fast, "speed: no recomputation"
    elif mode == "min" or (budget is None and ckpt.predicted_step_s <= (1 + AUTO_SLACK) * fast.predicted_step_s):
        chosen = ckpt
        why = ("min: checkpoint every decoder layer" if mode == "min" else
               f"auto: checkpointing saves {(fast.predicted_peak - ckpt.predicted_peak) / 2**20:.0f} MiB for "
               f"{ckpt.predicted_step_s / fast.predicted_step_s - 1:+.0%} step time (accepted up to +{AUTO_SLACK:.0%})")
    elif budget is None:
        chosen, why = fast, "auto: checkpointing would cost more than its memory is worth here"
    elif fast.predicted_peak <= budget:
        chosen, why = fast, f"auto: fits the {budget / 2**30:.1f} GiB budget without recomputation"
    else:
        chosen, why = ckpt, f"auto: checkpointing needed to fit the {budget / 2**30:.1f} GiB budget"
    if budget is not None and chosen.predicted_peak > budget:
        room = _largest_spill(args, chosen.checkpointing, budget)  # speed spills without recomputing
        chosen = _candidate(*args, chosen.checkpointing, room)
        why += f"; still over budget: saved activations past {room / 2**20:.0f} MiB spill to disk"
        if chosen.predicted_peak > budget:
            why += f" (predicted {chosen.predicted_peak / 2**30:.2f} GiB still exceeds the budget)"
    chosen.mode, chosen.reason = mode, why
    return chosen
