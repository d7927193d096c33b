"""The memory side of a run: the planner's choice applied (checkpointing, spill tier), the activation pager,
the RSS cap, the memory monitor, and what the plan predicted beside what was measured."""
from __future__ import annotations

from pathlib import Path

from forge_rt.core.dist import SINGLE, Dist
from forge_rt.plan.estimate import parse_bytes
from forge_rt.train.config import TrainConfig
from forge_rt.train.loop import batch_shape


def start_monitor(run: Path, pager, dist: Dist):
    from forge_rt.monitor import MemoryMonitor
    mon = MemoryMonitor(interval=0.1, out_path=run / dist.memory_name, paging=pager)
    mon.start()
    return mon


def make_pager(cfg: TrainConfig, run: Path, memory_plan):
    """The activation pager (entered around the training loop only) when --paging-budget or the memory
    plan asks for a spill tier; None otherwise and with --no-paging."""
    budget = cfg.paging_budget if cfg.paging_budget is not None else (
        memory_plan.spill_budget if memory_plan is not None else None)
    if cfg.no_paging or budget is None:
        return None
    import forge_rt
    spill = run / "spill"
    spill.mkdir(exist_ok=True)
    return forge_rt.paging(budget_bytes=parse_bytes(budget, "paging_budget"), spill_dir=str(spill))


def apply_plan(cfg: TrainConfig, base, tok_data, run: Path, dist: Dist = SINGLE):
    """The planner's choice for this model and data (None for the stock --no-fused baseline), applied:
    gradient checkpointing on the base model when chosen or forced with --grad-checkpointing."""
    memory_plan = None
    if not cfg.no_fused:
        from forge_rt.plan import Shapes, plan
        from forge_rt.plan.probe import probe
        batch, seq_len, labelled = batch_shape(tok_data, cfg)
        batch = max(1, -(-batch // dist.world))  # [distributed] each rank holds its shard of the global batch
        budget = parse_bytes(cfg.memory_budget, "memory_budget") if cfg.memory_budget else None
        memory_plan = plan(Shapes.from_config(base.config), batch, seq_len, cfg.memory, budget,
                           rates=probe(str(run)), labelled_fraction=labelled, lora_r=cfg.lora_r)
        print(f"memory: {memory_plan.reason}; predicted peak {memory_plan.predicted_peak / 2**30:.2f} GiB", flush=True)
    if cfg.grad_checkpointing or (memory_plan is not None and memory_plan.checkpointing):
        # Reentrant checkpointing saves each layer's input with save_for_backward, so the pager's hooks
        # see it (and spill it) when a spill tier is on; the non-reentrant kind keeps it out of reach.
        reentrant = not cfg.no_paging and (cfg.paging_budget is not None or
                                           (memory_plan is not None and memory_plan.spill_budget is not None))
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.enable_input_require_grads()
    return memory_plan


RSS_CAP_MARGIN = 0.05  # the cap sits this far above the predicted peak: a trim costs a few ms and refaults


def cap_rss(base, memory_plan):
    """Holds RSS near the planner's predicted peak: glibc's heap would otherwise keep what each layer's
    forward and backward freed (forge_rt.pager.heap). Checked at every decoder layer, trimmed when over."""
    if memory_plan is None:
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    from forge_rt.pager.heap import RssCap
    cap = RssCap(int(memory_plan.predicted_peak * (1 + RSS_CAP_MARGIN)))
    # the layers transformers checkpoints: every architecture's decoder layer, whatever its class is named
    cap.watch([m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)])
    return cap


def plan_record(memory_plan, res: dict, rss_cap=None) -> dict | None:
    """What the planner chose and why, its predicted peak beside the measured one, and how often the RSS cap
    trimmed the heap (with the cap it ended at: above the prediction when live memory was)."""
    if memory_plan is None:
        return None
    rec = memory_plan.as_dict()
    rec["measured_peak"] = res["peak_rss_bytes"]
    if rss_cap is not None:
        rec["heap_trims"], rec["rss_cap"] = rss_cap.trims, rss_cap.cap
    return rec
