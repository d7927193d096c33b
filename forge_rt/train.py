"""`python -m forge_rt.train`: offline QLoRA from a dataset to an evaluated adapter.

Default: SmolLM2-135M-Instruct (shipped GGUF, fp32) -> forge_rt NF4 quantization -> PEFT LoRA on all
linear layers -> forge_rt fused kernels (`accelerate`) -> activation paging, trained on the shipped
telemetry-triage demo and evaluated before and after. See `--help` for bringing your own model/data."""
from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from forge_rt import checkpoint as ckpt
from forge_rt.config import ConfigError, TrainConfig, parse_bytes, resolve, save_config


class RunError(RuntimeError):
    """A problem with the run itself (output directory, resume state), reported without a traceback."""


# --------------------------------------------------------------------------------------------- setup

def prepare_run_dir(cfg: TrainConfig, resume: str | None) -> Path:
    if resume is not None:
        run = Path(resume)
        if ckpt.latest_checkpoint(run / "checkpoints") is None:
            raise RunError(f"--resume {run}: no checkpoint in {run / 'checkpoints'}; start a new run instead")
        return run
    run = Path(cfg.output) if cfg.output else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if run.exists() and any(run.iterdir()):
        if not cfg.overwrite:
            raise RunError(f"output directory {run} exists; pass --overwrite to replace it or --resume {run} to continue it")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


@contextlib.contextmanager
def offline_guard():
    """forge_rt.sovereign.offline() when available (blocks egress); the hub libraries are set offline either way."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    try:
        from forge_rt.sovereign import offline
    except ImportError:
        yield None
        return
    with offline() as guard:
        yield guard


def _passphrase(cfg: TrainConfig) -> str | None:
    if not cfg.seal:
        return None
    phrase = os.environ.get("FORGE_RT_PASSPHRASE")
    if phrase:
        return phrase
    if not sys.stdin.isatty():
        raise ConfigError("--seal needs a passphrase: set FORGE_RT_PASSPHRASE or run in a terminal to be prompted")
    phrase = getpass.getpass("Passphrase to seal the adapter: ")
    if phrase != getpass.getpass("Repeat passphrase: "):
        raise ConfigError("the passphrases differ")
    return phrase


def load_inputs(cfg: TrainConfig):
    """Training/eval examples and retention text, checked before any model is loaded."""
    from forge_rt import data
    demo = data.demo_paths()
    train_path = Path(cfg.data) if cfg.data else demo["train"]
    eval_path = Path(cfg.eval_data) if cfg.eval_data else (demo["eval"] if cfg.data is None else None)
    retention_path = Path(cfg.retention_text) if cfg.retention_text else demo["retention"]
    train = data.load_examples(train_path)
    evals = data.load_examples(eval_path) if (eval_path is not None and not cfg.no_eval) else None
    if evals is not None and cfg.eval_limit:
        evals = evals[: cfg.eval_limit]
    try:
        retention = retention_path.read_text()
    except OSError as exc:
        raise RunError(f"retention text {retention_path} is unreadable: {exc}") from exc
    return train_path, train, evals, retention


def scrub_examples(examples, mode: str):
    """Scrubs PII/secrets from every message (forge_rt.scrub); returns (examples, counts-only report)."""
    if mode == "off":
        return examples, {"mode": "off"}
    from forge_rt.data import DataError, Examples
    from forge_rt.scrub import Scrubber
    scrubber = Scrubber(mode=mode)
    rows = scrubber.scrub_rows(examples)
    if not rows:
        raise DataError(examples.path, None, None, f"every row was dropped by --scrub {mode}",
                        "use --scrub mask, or clean the data")
    return Examples(rows, examples.format, examples.path), scrubber.report()


def target_module_names(model: torch.nn.Module, spec: str) -> list[str]:
    """Leaf names of the LoRA targets. 'all-linear' is resolved here, on the plain model, so it also
    holds after quantization swaps nn.Linear for NF4Linear (and so the adapter config lists names)."""
    if spec != "all-linear":
        names = [s.strip() for s in spec.split(",") if s.strip()]
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(f"target_modules {missing} are not modules of this model; e.g. {sorted(present)[:12]}")
        return names
    out = set()
    output_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not output_emb:
            out.add(name.rsplit(".", 1)[-1])
    return sorted(out)


def build_model(base: torch.nn.Module, cfg: TrainConfig, adapter_dir: Path | None = None):
    """Base -> (NF4 quantization) -> PEFT LoRA (new, or loaded from adapter_dir) -> (fused kernels)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    targets = target_module_names(base, cfg.target_modules)
    if not cfg.no_fused:
        from forge_rt.swap import quantize_model
        base = quantize_model(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(base, adapter_dir)
    else:
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(base, lcfg)
    if not cfg.no_fused:
        from forge_rt.swap import accelerate
        model = accelerate(model)
    return model


# ------------------------------------------------------------------------------------------ the loop

def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    cur = peak = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, so the peak covers training, not model loading.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


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
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum))


class _Stop:
    """While `deferring` (the training loop), SIGINT/SIGTERM set a flag: the loop checkpoints at the end
    of the current step and exits. Otherwise (evaluation), or on a second signal, they interrupt at once."""

    def __init__(self):
        self.signum = None
        self.deferring = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None or not self.deferring:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, writing a checkpoint, then exiting "
              "(send again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _Progress:
    """Rich live view (progress bar + the monitor's memory panel) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, start: int, live: bool, log_every: int, monitor):
        self.total, self.log_every, self.t0, self.start = total, log_every, time.time(), start
        self.live = None
        if live and sys.stdout.isatty():
            from rich.console import Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                TextColumn("mem {task.fields[mem]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-", mem="-")
            parts = [self.bar]
            panel = _live_panel(monitor)
            if panel is not None:
                parts.append(panel)
            self.live = Live(Group(*parts), refresh_per_second=4)
            self.live.start()

    def update(self, rec: dict) -> None:
        mem = f"{rec['rss_bytes'] / 2**30:.2f} GiB"
        if self.live is not None:
            self.bar.update(self.task, completed=rec["step"], loss=f"{rec['loss']:.4f}",
                            tps=f"{rec['tokens_per_s']:.0f}", mem=mem)
            return
        done = rec["step"] - self.start
        if rec["step"] % self.log_every == 0 or rec["step"] == self.total:
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - rec["step"])
            print(f"step {rec['step']}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                  f"{rec['tokens_per_s']:.0f} tok/s mem {mem} eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _live_panel(monitor):
    if monitor is None:
        return None
    try:
        from forge_rt.monitor import LivePanel
    except ImportError:
        return None
    return LivePanel(monitor)


def _start_monitor(run: Path, pager):
    try:
        from forge_rt.monitor import MemoryMonitor
    except ImportError:
        return None
    mon = MemoryMonitor(interval=0.1, out_path=run / "memory.jsonl", paging=pager)
    mon.start()
    return mon


def _mark(monitor, phase: str, step: int | None = None) -> None:
    if monitor is not None:
        monitor.mark(phase, step)


def _make_pager(cfg: TrainConfig, run: Path):
    """The activation pager (entered around the training loop only), or None with --no-paging."""
    if cfg.no_paging:
        return None
    import forge_rt
    if cfg.paging_budget is None:
        return forge_rt.paging()
    spill = run / "spill"
    spill.mkdir(exist_ok=True)
    return forge_rt.paging(budget_bytes=parse_bytes(cfg.paging_budget), spill_dir=str(spill))


def _pager_stats(pager) -> dict | None:
    return dict(pager.stats()) if pager is not None else None


def _batch(tok_data, indices: list[int]) -> tuple[dict, int]:
    """(collated batch, number of real tokens in it)."""
    from forge_rt.data import collate
    items = [tok_data[i] for i in indices]
    return collate(items, tok_data.pad_token_id), sum(len(it["input_ids"]) for it in items)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _evaluate(model, tok, evals, retention, cfg: TrainConfig) -> dict:
    from forge_rt.evaluate import evaluate  # eval mode, no_grad and timing are evaluate()'s own
    return evaluate(model, tok, evals, retention, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)


def train_loop(model, tok, tok_data, cfg: TrainConfig, run: Path, resume_state: dict | None, monitor, pager,
               stop: _Stop) -> dict:
    """Runs optimizer steps up to the configured total; returns a summary. Checkpoints periodically,
    at the end and on SIGINT/SIGTERM (summary['interrupted'] is then the signal number)."""
    from transformers import get_scheduler
    params = _trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_total = total_steps(cfg, len(tok_data))
    sched = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=min(cfg.warmup_steps, n_total), num_training_steps=n_total)
    order = DataOrder(len(tok_data), cfg.batch_size, cfg.seed)
    step = 0
    if resume_state is not None:
        with torch.no_grad():
            for name, value in resume_state["weights"].items():
                params[name].copy_(value)
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        order = DataOrder(len(tok_data), cfg.batch_size, cfg.seed, **resume_state["data"])
        step = resume_state["step"]
        ckpt.restore_rng(resume_state["rng"])
    metrics_path = run / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)

    def save(at: int) -> None:
        _mark(monitor, "checkpoint", at)
        ckpt.save_checkpoint(run / "checkpoints", at, {n: p.data for n, p in params.items()},
                             opt.state_dict(), sched.state_dict(), order.state())

    model.train()
    stop.deferring = True
    progress = _Progress(n_total, step, not cfg.no_live, cfg.log_every, monitor)
    t_start, step_times, tps_all = time.time(), [], []
    _reset_peak_rss()
    try:
        with metrics_path.open("a") as mlog:
            while step < n_total and stop.signum is None:
                t0 = time.time()
                losses, n_tok = [], 0
                for _ in range(cfg.grad_accum):
                    batch, n = _batch(tok_data, order.next())
                    n_tok += n
                    _mark(monitor, "forward", step + 1)
                    out = model(**batch, use_cache=False)  # with a cache, packed rows would attend across examples
                    _mark(monitor, "backward", step + 1)
                    (out.loss / cfg.grad_accum).backward()
                    losses.append(out.loss.item())
                _mark(monitor, "optimizer", step + 1)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                paged = pager.end_step() if pager is not None else None
                step += 1
                dt = time.time() - t0
                rss, peak = _rss()
                rec = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "tokens": n_tok,
                       "tokens_per_s": n_tok / dt, "step_time_s": dt, "elapsed_s": time.time() - t_start,
                       "rss_bytes": rss, "peak_rss_bytes": peak, "epoch": order.epoch, "paging": paged}
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                step_times.append(dt)
                tps_all.append(rec["tokens_per_s"])
                progress.update(rec)
                if step < n_total and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save(step)
        save(step)
    finally:
        stop.deferring = False
        progress.close()
    return {"steps": step, "total_steps": n_total, "interrupted": stop.signum,
            "train_time_s": time.time() - t_start, "step_times": step_times,
            "peak_rss_bytes": _rss()[1], "tokens_per_s_mean": (sum(tps_all) / len(tps_all)) if tps_all else None}


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


# ------------------------------------------------------------------------------------------- main

def run_training(cfg: TrainConfig, run: Path, resume: str | None, guard=None) -> int:
    from forge_rt.model_load import load_model
    from forge_rt import report
    t_all = time.time()
    passphrase = _passphrase(cfg)
    train_path, train, evals, retention = load_inputs(cfg)
    train, scrub_report = scrub_examples(train, cfg.scrub)
    print(f"data: {len(train)} training examples ({getattr(train, 'format', '?')} format) from {train_path}"
          + (f"; {len(evals)} held-out" if evals is not None else ""), flush=True)
    save_config(cfg, run / "config.json")

    torch.manual_seed(cfg.seed)
    base, tok = load_model(cfg.model)
    from forge_rt.data import tokenize_examples
    tok_data = tokenize_examples(train, tok, cfg.max_len, pack=cfg.pack)
    n_trunc = int(getattr(tok_data, "n_truncated", 0))
    if n_trunc:
        print(f"data: {n_trunc} of {len(train)} examples are longer than max_len={cfg.max_len} tokens and were truncated",
              flush=True)
    if cfg.grad_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(cfg.seed)  # LoRA init
    model = build_model(base, cfg)
    summary = getattr(model, "forge_rt_summary", None)
    if summary:
        print(f"fused: {summary}", flush=True)

    resume_state = None
    if resume is not None:
        last = ckpt.latest_checkpoint(run / "checkpoints")
        resume_state = ckpt.load_checkpoint(last)
        print(f"resume: {last} (step {resume_state['step']})", flush=True)

    eval_base_path = run / "eval_base.json"
    do_eval = not cfg.no_eval and evals is not None
    if not cfg.no_eval and evals is None:
        print("eval: skipped, no --eval-data given for this dataset", flush=True)
    pager = _make_pager(cfg, run)
    monitor = _start_monitor(run, pager)
    t_eval, tuned_res = 0.0, None
    # From here on SIGINT/SIGTERM end the run cleanly: at once during eval, at a step end in training.
    with _Stop() as stop:
        try:
            if do_eval and not eval_base_path.exists():
                print("eval: base model ...", flush=True)
                _mark(monitor, "eval")
                base_res = _evaluate(model, tok, evals, retention, cfg)
                t_eval += base_res["seconds"]
                eval_base_path.write_text(json.dumps(_jsonable(base_res, t_eval)))
            with pager or contextlib.nullcontext():
                res = train_loop(model, tok, tok_data, cfg, run, resume_state, monitor, pager, stop)
            paging_stats = _pager_stats(pager)
            if res["interrupted"] is not None:
                print(f"interrupted at step {res['steps']}/{res['total_steps']}; checkpoint written. "
                      f"Continue with: python -m forge_rt.train --resume {run}", flush=True)
                return 128 + int(res["interrupted"])
            model.save_pretrained(run / "adapter")
            tok.save_pretrained(run / "tokenizer")
            if do_eval:
                print("eval: tuned model ...", flush=True)
                _mark(monitor, "eval")
                tuned_res = _evaluate(model, tok, evals, retention, cfg)
                t_eval += tuned_res["seconds"]
        finally:
            if monitor is not None:
                monitor.stop()
    base_res = json.loads(eval_base_path.read_text()) if eval_base_path.exists() else None

    metrics = report.build_metrics(cfg, res, base_res, _jsonable(tuned_res, None) if tuned_res else None,
                                   data={"format": getattr(train, "format", None), "n_train": len(train),
                                         "n_eval": len(evals) if evals is not None else 0,
                                         "n_truncated": n_trunc, "path": str(train_path)},
                                   scrub=scrub_report, paging=paging_stats, fused_summary=summary,
                                   eval_time_s=t_eval, total_time_s=time.time() - t_all)
    finish_sovereign(cfg, run, train_path, passphrase, metrics)
    if guard is not None:
        metrics["egress_attempts"] = len(guard.attempts)
        metrics["egress"] = guard.report()["summary"]
    report.write_run_report(run, metrics, read_metrics(run / "metrics.jsonl"))
    print(report.summary_line(metrics), flush=True)
    print(f"run: {run}", flush=True)
    return 0


def finish_sovereign(cfg: TrainConfig, run: Path, train_path: Path, passphrase: str | None, metrics: dict) -> None:
    """--seal: encrypt adapter/ to adapter.sealed, then shred the plaintext adapter and the checkpoints
    (they hold the same weights). --shred-data: shred the training file (never the shipped demo)."""
    if cfg.seal or cfg.shred_data:
        from forge_rt import shred
    if cfg.seal:
        from forge_rt import seal
        metrics["sealed"] = seal.seal_dir(run / "adapter", run / "adapter.sealed", passphrase)
        plaintext = [p for p in (run / "adapter", run / "checkpoints") if p.exists()]
        metrics["sealed"]["plaintext_shredded"] = shred.shred_paths(plaintext)["files"]
    if cfg.shred_data:
        if cfg.data is None:
            print("shred: skipped, the training data is the shipped demo", flush=True)
            metrics["shredded"] = None
        else:
            metrics["shredded"] = shred.shred_paths([train_path])


def _jsonable(res: dict, seconds: float | None) -> dict:
    out = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    if seconds is not None:
        out["eval_time_s"] = seconds
    return out


def main(argv: list[str] | None = None) -> int:
    from forge_rt.data import DataError
    from forge_rt.model_load import ModelLoadError, check_model_path
    from forge_rt.pager import PagingError
    from forge_rt.scrub import ScrubError
    run = None
    try:
        cfg, resume = resolve(argv)
        if cfg.model is not None:
            check_model_path(cfg.model)
        with offline_guard() as guard:
            run = prepare_run_dir(cfg, resume)
            return run_training(cfg, run, resume, guard)
    except KeyboardInterrupt:
        resumable = run is not None and ckpt.latest_checkpoint(run / "checkpoints") is not None
        hint = f"; continue with --resume {run}" if resumable else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    except (ConfigError, RunError, ModelLoadError, ckpt.CheckpointError, DataError, ScrubError,
            PagingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
