"""One training run, orchestrated: check the inputs, prepare the run directory, build the model,
evaluate the base, train, save, evaluate the tuned model, seal/shred, write the report."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch

from forge_rt.errors import ForgeError
from forge_rt.train import checkpoint as ckpt
from forge_rt.train.config import TrainConfig, parse_bytes, save_config
from forge_rt.train.console import Stop
from forge_rt.train.loop import _mark, read_metrics, train_loop


class RunError(ForgeError, RuntimeError):
    """A problem with the run itself (output directory, resume state), reported without a traceback."""


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
    """forge_rt.sovereign.offline(): blocks egress and puts the hub libraries in offline mode."""
    from forge_rt.sovereign import offline
    with offline() as guard:
        yield guard


def load_inputs(cfg: TrainConfig):
    """Training/eval examples and retention text, checked before any model is loaded."""
    from forge_rt.train import data
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
    """Scrubs PII/secrets from every message (forge_rt.sovereign.scrub); returns (examples, counts-only report)."""
    if mode == "off":
        return examples, {"mode": "off"}
    from forge_rt.sovereign.scrub import Scrubber
    from forge_rt.train.data import DataError, Examples
    scrubber = Scrubber(mode=mode)
    rows = scrubber.scrub_rows(examples)
    if not rows:
        raise DataError(examples.path, None, None, f"every row was dropped by --scrub {mode}",
                        "use --scrub mask, or clean the data")
    return Examples(rows, examples.format, examples.path), scrubber.report()


def _start_monitor(run: Path, pager):
    from forge_rt.monitor import MemoryMonitor
    mon = MemoryMonitor(interval=0.1, out_path=run / "memory.jsonl", paging=pager)
    mon.start()
    return mon


def _make_pager(cfg: TrainConfig, run: Path, memory_plan):
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


def _memory_plan(cfg: TrainConfig, base, tok_data, run: Path):
    """The planner's choice for this model and data (None for the stock --no-fused baseline), applied:
    gradient checkpointing on the base model when chosen or forced with --grad-checkpointing."""
    memory_plan = None
    if not cfg.no_fused:
        from forge_rt.plan import Shapes, plan
        from forge_rt.plan.probe import probe
        from forge_rt.train.loop import batch_shape
        batch, seq_len, labelled = batch_shape(tok_data, cfg)
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


def _evaluate(model, tok, evals, retention, cfg: TrainConfig) -> dict:
    from forge_rt.train.evaluate import evaluate  # eval mode, no_grad and timing are evaluate()'s own
    return evaluate(model, tok, evals, retention, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)


def _prepare(cfg: TrainConfig, run: Path):
    """Inputs checked and scrubbed, model loaded and built; returns what the run needs."""
    from forge_rt.train.data import tokenize_examples
    from forge_rt.train.model import build_model, load_model
    train_path, train, evals, retention = load_inputs(cfg)
    train, scrub_report = scrub_examples(train, cfg.scrub)
    print(f"data: {len(train)} training examples ({getattr(train, 'format', '?')} format) from {train_path}"
          + (f"; {len(evals)} held-out" if evals is not None else ""), flush=True)
    save_config(cfg, run / "config.json")

    torch.manual_seed(cfg.seed)
    base, tok = load_model(cfg.model)
    tok_data = tokenize_examples(train, tok, cfg.max_len, pack=cfg.pack)
    n_trunc = int(getattr(tok_data, "n_truncated", 0))
    if n_trunc:
        print(f"data: {n_trunc} of {len(train)} examples are longer than max_len={cfg.max_len} tokens and were truncated",
              flush=True)
    memory_plan = _memory_plan(cfg, base, tok_data, run)
    torch.manual_seed(cfg.seed)  # LoRA init
    model = build_model(base, cfg)
    summary = getattr(model, "forge_rt_summary", None)
    if summary:
        print(f"fused: {summary['accelerated']} LoRA layers fused, stock path: {summary['skipped'] or 'none'}",
              flush=True)
    data_info = {"format": getattr(train, "format", None), "n_train": len(train),
                 "n_eval": len(evals) if evals is not None else 0, "n_truncated": n_trunc, "path": str(train_path),
                 "memory_plan": memory_plan}
    return model, tok, tok_data, evals, retention, train_path, scrub_report, summary, data_info


def _train_and_eval(model, tok, tok_data, evals, retention, cfg: TrainConfig, run: Path, resume: str | None,
                    data_info: dict):
    """Base eval, training, adapter save, tuned eval; returns (train summary, tuned result, paging stats,
    eval seconds), or the exit code of an interrupted run as the train summary's 'interrupted'."""
    resume_state = None
    if resume is not None:
        last = ckpt.latest_checkpoint(run / "checkpoints")
        resume_state = ckpt.load_checkpoint(last)
        print(f"resume: {last} (step {resume_state['step']})", flush=True)
    eval_base_path = run / "eval_base.json"
    do_eval = not cfg.no_eval and evals is not None
    if not cfg.no_eval and evals is None:
        print("eval: skipped, no --eval-data given for this dataset", flush=True)
    pager = _make_pager(cfg, run, data_info["memory_plan"])
    monitor = _start_monitor(run, pager)
    t_eval, tuned_res, paging_stats = 0.0, None, None
    # From here on SIGINT/SIGTERM end the run cleanly: at once during eval, at a step end in training.
    with Stop() as stop:
        try:
            if do_eval and not eval_base_path.exists():
                print("eval: base model ...", flush=True)
                _mark(monitor, "eval")
                base_res = _evaluate(model, tok, evals, retention, cfg)
                t_eval += base_res["seconds"]
                eval_base_path.write_text(json.dumps(_jsonable(base_res, t_eval)))
            with pager or contextlib.nullcontext():
                res = train_loop(model, tok_data, cfg, run, resume_state, monitor, pager, stop)
            paging_stats = dict(pager.stats()) if pager is not None else None
            if res["interrupted"] is not None:
                return res, None, paging_stats, t_eval
            model.save_pretrained(run / "adapter")
            tok.save_pretrained(run / "tokenizer")
            if do_eval:
                print("eval: tuned model ...", flush=True)
                _mark(monitor, "eval")
                tuned_res = _evaluate(model, tok, evals, retention, cfg)
                t_eval += tuned_res["seconds"]
        finally:
            monitor.stop()
    return res, tuned_res, paging_stats, t_eval


def run_training(cfg: TrainConfig, run: Path, resume: str | None, guard=None) -> int:
    from forge_rt.train import report
    from forge_rt.sovereign.passphrase import get_passphrase
    t_all = time.time()
    passphrase = get_passphrase(confirm=True, what="passphrase to seal the adapter") if cfg.seal else None
    model, tok, tok_data, evals, retention, train_path, scrub_report, summary, data_info = _prepare(cfg, run)
    res, tuned_res, paging_stats, t_eval = _train_and_eval(model, tok, tok_data, evals, retention, cfg, run, resume,
                                                           data_info)
    if res["interrupted"] is not None:
        print(f"interrupted at step {res['steps']}/{res['total_steps']}; checkpoint written. "
              f"Continue with: python -m forge_rt.train --resume {run}", flush=True)
        return 128 + int(res["interrupted"])
    base_path = run / "eval_base.json"
    base_res = json.loads(base_path.read_text()) if base_path.exists() else None
    memory_plan = data_info.pop("memory_plan")
    metrics = report.build_metrics(cfg, res, base_res, _jsonable(tuned_res, None) if tuned_res else None,
                                   data=data_info, scrub=scrub_report, paging=paging_stats, fused_summary=summary,
                                   eval_time_s=t_eval, total_time_s=time.time() - t_all)
    metrics["memory_plan"] = _plan_record(memory_plan, res)
    metrics["exports"] = _export(cfg, run)
    finish_sovereign(cfg, run, train_path, passphrase, metrics)
    if guard is not None:
        metrics["egress_attempts"] = len(guard.attempts)
        metrics["egress"] = guard.report()["summary"]
    report.write_run_report(run, metrics, read_metrics(run / "metrics.jsonl"))
    print(report.summary_line(metrics), flush=True)
    print(f"run: {run}", flush=True)
    return 0


EXPORT_NAMES = {"gguf": "model-{quant}.gguf", "gguf-lora": "adapter-{quant}.gguf", "hf": "hf"}


def _export(cfg: TrainConfig, run: Path) -> list[dict] | None:
    """--export: the deployable files under RUN/export/ (before --seal shreds the plaintext adapter)."""
    if not cfg.export:
        return None
    from forge_rt.export import export_run
    kinds = [k.strip() for k in cfg.export.split(",") if k.strip()]
    targets = {k: run / "export" / EXPORT_NAMES[k].format(quant=cfg.export_quant) for k in kinds}
    (run / "export").mkdir(exist_ok=True)
    print(f"export: {', '.join(kinds)} ...", flush=True)
    return export_run(run, targets, quant=cfg.export_quant)


def _plan_record(memory_plan, res: dict) -> dict | None:
    """What the planner chose and why, its predicted peak beside the measured one."""
    if memory_plan is None:
        return None
    rec = memory_plan.as_dict()
    rec["measured_peak"] = res["peak_rss_bytes"]
    rec["measured_pre_step"] = res.get("pre_step_rss_bytes")
    return rec


def finish_sovereign(cfg: TrainConfig, run: Path, train_path: Path, passphrase: str | None, metrics: dict) -> None:
    """--seal: encrypt adapter/ to adapter.sealed, then shred the plaintext adapter and the checkpoints
    (they hold the same weights). --shred-data: shred the training file (never the shipped demo)."""
    from forge_rt.sovereign import shred
    if cfg.seal:
        from forge_rt.sovereign import seal
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
