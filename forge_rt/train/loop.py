"""The optimizer loop: deterministic data order, steps with gradient accumulation, per-step metrics,
periodic checkpoints, and a clean stop on SIGINT/SIGTERM at a step end."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from forge_rt.core.errors import ForgeError
from forge_rt.monitor.sources import process_rss, reset_peak_rss
from forge_rt.pager.heap import trim_heap
from forge_rt.train import checkpoint as ckpt
from forge_rt.train.config import TrainConfig
from forge_rt.train.console import Progress, Stop
from forge_rt.core.dist import SINGLE, Dist, labelled_tokens


class DivergenceError(ForgeError, RuntimeError):
    """Training diverged (a non-finite loss or gradient, or a loss that blew up); the weights of the last
    good checkpoint are kept and no adapter is written."""


class DivergenceGuard:
    """Stops a run at once on a non-finite loss or gradient norm (before the optimizer applies it), and
    after `PATIENCE` steps whose loss is over `FACTOR` x the run's first loss (warning at the first)."""
    FACTOR = 3.0
    PATIENCE = 3

    def __init__(self, cfg: TrainConfig, root: Path, start_loss: float | None):
        self.cfg, self.root, self.start, self.over = cfg, root, start_loss, 0

    def _stop(self, step: int, what: str) -> DivergenceError:
        last = ckpt.latest_checkpoint(self.root)
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written before it"
        return DivergenceError(f"training diverged at step {step}: {what}. Stopped; {kept} and no adapter was "
                               f"written. Fix: start a new run with a lower --lr (this one: {self.cfg.lr:g}) "
                               "or more --warmup-steps, and check the data")

    def check_finite(self, step: int, loss: float, grad_norm: float) -> None:
        if not math.isfinite(loss):
            raise self._stop(step, f"the loss is {loss}")
        if not math.isfinite(grad_norm):
            raise self._stop(step, f"the gradient norm is {grad_norm} (loss {loss:.4g})")

    def check_trend(self, step: int, loss: float, tokens: int) -> None:
        if tokens == 0:  # [DP] an empty Poisson sample: no loss was measured, the row repeats the last one
            return
        if self.start is None:
            self.start = loss
        if loss <= self.FACTOR * self.start:
            self.over = 0
            return
        self.over += 1
        what = f"the loss {loss:.4g} is over {self.FACTOR:g}x the starting loss {self.start:.4g}"
        if self.over >= self.PATIENCE:
            raise self._stop(step, f"{what} for {self.over} steps")
        if self.over == 1:
            print(f"warning: step {step}: {what}: training is diverging; it stops if this lasts "
                  f"{self.PATIENCE} steps", file=sys.stderr, flush=True)

    @property
    def healthy(self) -> bool:
        """Whether a checkpoint taken now holds good weights."""
        return self.over == 0


class DataOrder:
    """Deterministic shuffled micro-batches; the (epoch, position) state is what a checkpoint stores."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.bs, self.seed, self.epoch, self.pos = n, batch_size, seed, epoch, pos
        self.per_epoch = math.ceil(n / batch_size)

    def next(self) -> list[int]:
        if self.pos >= self.per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        idx = perm[self.pos * self.bs:(self.pos + 1) * self.bs].tolist()
        self.pos += 1
        return idx

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    # [DP] with --dp-batch a step is one Poisson sample of that expected size
    per_epoch = n_examples / cfg.dp_batch if cfg.dp_batch else math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


def _mark(monitor, phase: str, step: int | None = None) -> None:
    if monitor is not None:
        monitor.mark(phase, step)


def _batch(tok_data, indices: list[int]) -> tuple[dict, int]:
    """(collated batch, number of real tokens in it)."""
    from forge_rt.data import collate
    items = [tok_data[i] for i in indices]
    return collate(items, tok_data.pad_token_id), sum(len(it["input_ids"]) for it in items)


def batch_shape(tok_data, cfg: TrainConfig) -> tuple[int, float, float]:
    """(examples per micro-batch, mean padded length of a micro-batch over one epoch, share of the padded
    tokens that carry a label): what the memory planner needs to know of the data."""
    order = DataOrder(len(tok_data), cfg.batch_size, cfg.seed)
    widths, labelled = [], 0
    for _ in range(order.per_epoch):
        lengths = [len(tok_data.input_ids[i]) for i in order.next()]
        widths.append(max(lengths) * len(lengths))
    labelled = sum(sum(t != -100 for t in lab) for lab in tok_data.labels)
    padded = sum(widths)
    return cfg.batch_size, padded / order.per_epoch / cfg.batch_size, labelled / padded


def _loss(model, batch: dict, chunked: bool, **kw) -> torch.Tensor:
    if chunked:  # the LM head only where labels are, a chunk of rows at a time (forge_rt.nn.lm_loss)
        from forge_rt.nn.lm_loss import causal_lm_loss
        return causal_lm_loss(model, **batch, use_cache=False, **kw)
    return model(**batch, use_cache=False, **kw).loss  # with a cache, packed rows would attend across examples


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class _State:
    """Optimizer, schedule and data order of a run, restored from a checkpoint when resuming."""

    def __init__(self, model, cfg: TrainConfig, n_examples: int, resume_state: dict | None, dist: Dist = SINGLE):
        from transformers import get_scheduler
        self.dist, self.agreed_stop = dist, None  # [distributed] the stop all ranks agreed on at the last step
        self.params = trainable(model)
        self.opt = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.total = total_steps(cfg, n_examples)
        self.sched = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", self.opt,
                                   num_warmup_steps=min(cfg.warmup_steps, self.total), num_training_steps=self.total)
        self.order = DataOrder(n_examples, cfg.batch_size, cfg.seed)
        self.step, self.last_loss, self.dp = 0, 0.0, None
        if cfg.dp:  # [DP] checked again with the data and the ranks; says its noise
            from forge_rt.privacy.session import DPRun
            self.dp = DPRun.start(model, cfg.dp_settings(), n_examples, self.total, cfg, dist.world)
        if resume_state is not None:
            with torch.no_grad():
                for name, value in resume_state["weights"].items():
                    self.params[name].copy_(value)
            self.opt.load_state_dict(resume_state["optimizer"])
            self.sched.load_state_dict(resume_state["scheduler"])
            data = dict(resume_state["data"])
            dp_state = data.pop("dp", None)  # [DP] the accountant's steps so far: epsilon goes on from there
            if self.dp is not None and dp_state is not None:
                self.dp.load_state_dict(dp_state)
            self.order = DataOrder(n_examples, cfg.batch_size, cfg.seed, **data)
            self.step = resume_state["step"]
            ckpt.restore_rng(resume_state["rng"])
        dist.reseed(cfg.seed, self.step)

    def save(self, root: Path) -> None:
        ckpt.save_checkpoint(root, self.step, {n: p.data for n, p in self.params.items()},
                             self.opt.state_dict(), self.sched.state_dict(),
                             {**self.order.state(), **({"dp": self.dp.state_dict()} if self.dp else {})})


def _dp_step(model, tok_data, cfg: TrainConfig, st: _State, monitor) -> tuple[list[float], int]:
    """[DP] one Poisson-sampled batch in micro-batches; p.grad becomes the clipped, noised gradient."""
    from forge_rt.privacy import example_losses
    n_tok = []

    def losses_of(indices):
        batch, n = _batch(tok_data, indices)
        n_tok.append(n)
        _mark(monitor, "forward", st.step + 1)
        return example_losses(model, **batch, chunked=not cfg.no_fused)
    losses, _ = st.dp.step(losses_of)
    return losses or [st.last_loss], sum(n_tok)  # an empty sample (rare) still steps: noise only


def _micro(model, tok_data, cfg: TrainConfig, st: _State, monitor) -> tuple[float, int]:
    """Forward and backward of one micro-batch, or of this rank's shard of it under torchrun; returns
    (loss, tokens)."""
    indices = st.order.next()
    mine, kw = indices, {}
    if st.dist.enabled:  # [distributed] each rank's loss is over the global label count: their sum is the mean
        mine, kw = st.dist.shard(indices), {"num_items_in_batch": max(1, labelled_tokens(tok_data, indices))}
        if not mine:
            return 0.0, 0
    batch, n = _batch(tok_data, mine)
    _mark(monitor, "forward", st.step + 1)
    loss = _loss(model, batch, chunked=not cfg.no_fused, **kw)
    _mark(monitor, "backward", st.step + 1)
    (loss / cfg.grad_accum).backward()
    return loss.item(), n


def _step(model, tok_data, cfg: TrainConfig, st: _State, monitor, guard: DivergenceGuard,
          stop: Stop | None = None) -> tuple[list[float], int, float]:
    """One optimizer step (cfg.grad_accum micro-batches); returns (micro-batch losses, tokens, lr). A
    non-finite loss or gradient stops the run before the optimizer applies it."""
    losses, n_tok = _dp_step(model, tok_data, cfg, st, monitor) if st.dp is not None else ([], 0)
    for _ in range(cfg.grad_accum if st.dp is None else 0):
        loss, n = _micro(model, tok_data, cfg, st, monitor)
        losses.append(loss)
        n_tok += n
    _mark(monitor, "optimizer", st.step + 1)
    if st.dist.enabled:  # [distributed] one all-reduce: gradients, losses, tokens and a pending stop
        losses, n_tok, st.agreed_stop = st.dist.sync_step(st.params.values(), losses, n_tok,
                                                          stop.signum if stop is not None else None)
    # max_norm inf measures the norm without clipping.
    norm = torch.nn.utils.clip_grad_norm_(st.params.values(), cfg.max_grad_norm or math.inf)
    guard.check_finite(st.step + 1, sum(losses) / len(losses), float(norm))
    lr = st.sched.get_last_lr()[0]
    st.opt.step()
    st.sched.step()
    st.opt.zero_grad(set_to_none=True)
    st.last_loss = sum(losses) / len(losses)
    return losses, n_tok, lr


def _stopped(st: _State, stop: Stop) -> int | None:
    """The signal that ends the run: this process's, or under torchrun the one the ranks agreed on."""
    return st.agreed_stop if st.dist.enabled else stop.signum


def train_loop(model, tok_data, cfg: TrainConfig, run: Path, resume_state: dict | None, monitor, pager,
               stop: Stop, dist: Dist = SINGLE) -> dict:
    """Runs optimizer steps up to the configured total; returns a summary. Checkpoints periodically,
    at the end and on SIGINT/SIGTERM (summary['interrupted'] is then the signal number)."""
    st = _State(model, cfg, len(tok_data), resume_state, dist)
    metrics_path = run / "metrics.jsonl"
    if dist.is_main:  # [distributed] only rank 0 writes the run directory
        _truncate_metrics(metrics_path, st.step)
    earlier = read_metrics(metrics_path) if dist.is_main else []
    start = next((r["loss"] for r in earlier if r["tokens"]), None)
    guard = DivergenceGuard(cfg, run / "checkpoints", dist.broadcast(start))

    def save() -> None:
        _mark(monitor, "checkpoint", st.step)
        if dist.is_main:
            # The heap still holds what the steps freed (up to the RSS cap): hand it back before writing (on the
            # 7B shape, 1.3 -> 0.7 GiB over the pre-training RSS at the last checkpoint, bench_7b.json).
            trim_heap()
            st.save(run / "checkpoints")

    model.train()
    stop.deferring = True
    progress = Progress(st.total, st.step, not cfg.no_live, cfg.log_every, monitor)
    t_start, step_times, tps_all = time.time(), [], []
    reset_peak_rss()  # the peak then covers training, not model loading
    pre_step_rss = process_rss()[0]
    try:
        with (metrics_path if dist.is_main else Path(os.devnull)).open("a") as mlog:
            while st.step < st.total and _stopped(st, stop) is None:
                t0 = time.time()
                losses, n_tok, lr = _step(model, tok_data, cfg, st, monitor, guard, stop)
                paged = pager.end_step() if pager is not None else None
                st.step += 1
                dt = time.time() - t0
                rss, peak = process_rss()
                rec = {"step": st.step, "loss": sum(losses) / len(losses), "lr": lr, "tokens": n_tok,
                       "tokens_per_s": n_tok / dt, "step_time_s": dt, "elapsed_s": time.time() - t_start,
                       "rss_bytes": rss, "peak_rss_bytes": peak, "epoch": st.order.epoch, "paging": paged,
                       **({"epsilon": st.dp.epsilon()} if st.dp is not None else {})}
                mlog.write(json.dumps(rec, allow_nan=False) + "\n")  # strict JSON: the guard ran
                mlog.flush()
                step_times.append(dt)
                tps_all.append(rec["tokens_per_s"])
                progress.update(rec)
                guard.check_trend(st.step, rec["loss"], n_tok)
                if (st.step < st.total and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
                        and guard.healthy):
                    save()
        save()
    finally:
        stop.deferring = False
        progress.close()
    return {"steps": st.step, "total_steps": st.total, "interrupted": _stopped(st, stop),
            "train_time_s": time.time() - t_start, "step_times": step_times,
            "peak_rss_bytes": process_rss()[1], "pre_step_rss_bytes": pre_step_rss,
            "dp": st.dp.record() if st.dp is not None else None, "tokens_per_s_mean": (sum(tps_all) / len(tps_all)) if tps_all else None}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drops per-step records past the checkpoint (those steps are redone)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in keep))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
