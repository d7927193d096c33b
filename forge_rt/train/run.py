"""One training run, orchestrated: build the model, evaluate the base, train, save, evaluate the tuned model,
export, seal/shred, write the report. Inputs (train.inputs) and the run directory (train.place) are
ready before it starts."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from forge_rt.core.dist import SINGLE, Dist
from forge_rt.data import tokenize_examples
from forge_rt.models import build_model, load_model
from forge_rt.train import checkpoint as ckpt
from forge_rt.train import deliver, memory
from forge_rt.train.config import TrainConfig, save_config
from forge_rt.train.console import Stop
from forge_rt.train.evaluation import RunEval, eval_record
from forge_rt.train.inputs import Inputs
from forge_rt.train.loop import _mark, read_metrics, train_loop
from forge_rt.train.place import RunPlace, save_adapter


def _evaluate(evaluator: RunEval, model, tok, tuned: bool) -> dict:
    # eval mode, no_grad, timing and the base score's cache are the evaluator's own
    return evaluator.tuned(model, tok) if tuned else evaluator.base(model, tok)


def _prepare(cfg: TrainConfig, run: Path, inputs: Inputs, dist: Dist):
    """Model loaded and built, data tokenized; returns what the run needs."""
    train, evals = inputs.train, inputs.evals
    print(f"data: {len(train)} training examples ({getattr(train, 'format', '?')} format) from {inputs.train_path}"
          + (f"; {len(evals)} held-out" if evals is not None else ""), flush=True)
    if dist.is_main:
        save_config(cfg, run / "config.json")

    torch.manual_seed(cfg.seed)
    base, tok = load_model(cfg.model, nf4=not cfg.no_fused, tokenizer=inputs.tokenizer)
    inputs.prompt.apply(tok)  # saved with the adapter: generate, evaluation and export render the same format
    print(f"prompt format: {inputs.prompt.name} ({inputs.prompt.reason})", flush=True)
    tok_data = tokenize_examples(train, tok, cfg.max_len, pack=cfg.pack)
    n_trunc = int(getattr(tok_data, "n_truncated", 0))
    if n_trunc:
        print(f"data: {n_trunc} of {len(train)} examples are longer than max_len={cfg.max_len} tokens and were truncated",
              flush=True)
    memory_plan = memory.apply_plan(cfg, base, tok_data, run, dist)
    torch.manual_seed(cfg.seed)  # LoRA init
    model = build_model(base, cfg.lora_spec())
    rss_cap = None if cfg.no_rss_cap else memory.cap_rss(base, memory_plan)
    summary = getattr(model, "forge_rt_summary", None)
    if summary:
        print(f"fused: {summary['accelerated']} LoRA layers fused, stock path: {summary['skipped'] or 'none'}",
              flush=True)
    data_info = {"format": getattr(train, "format", None), "prompt_format": inputs.prompt.as_dict(), "n_train": len(train),
                 "n_eval": len(evals) if evals is not None else 0, "n_truncated": n_trunc,
                 "path": str(inputs.train_path), "memory_plan": memory_plan, "rss_cap": rss_cap}
    return model, tok, tok_data, summary, data_info


def _load_resume(run: Path) -> dict:
    last, state = ckpt.load_latest(run / "checkpoints")
    print(f"resume: {last} (step {state['step']})", flush=True)
    return state


def _train_and_eval(model, tok, tok_data, inputs: Inputs, cfg: TrainConfig, run: Path, resume: str | None,
                    data_info: dict, dist: Dist):
    """Base eval, training, adapter save, tuned eval; returns (train summary, tuned result, paging stats,
    eval seconds), or the exit code of an interrupted run as the train summary's 'interrupted'."""
    # [distributed] rank 0 reads the checkpoint and the run directory; every rank gets what it found.
    resume_state = dist.from_main(lambda: _load_resume(run), "resume") if resume is not None else None
    eval_base_path = run / "eval_base.json"
    evals = inputs.evals
    do_eval = not cfg.no_eval and evals is not None
    do_base = dist.broadcast(do_eval and not eval_base_path.exists())
    if not cfg.no_eval and evals is None:
        print("eval: skipped, no --eval-data given for this dataset", flush=True)
    evaluator = RunEval(cfg, inputs, dist) if do_eval else None
    if evaluator is not None:
        print(f"eval: {evaluator.describe()}", flush=True)
    pager = memory.make_pager(cfg, run, data_info["memory_plan"])
    monitor = memory.start_monitor(run, pager, dist)
    t_eval, tuned_res, paging_stats = 0.0, None, None
    # From here on SIGINT/SIGTERM end the run cleanly: at once during eval, at a step end in training.
    with Stop() as stop:
        try:
            if do_base:
                _mark(monitor, "eval")
                base_res = _evaluate(evaluator, model, tok, tuned=False)
                t_eval += base_res["seconds"]
                if dist.is_main:
                    eval_base_path.write_text(json.dumps(_jsonable(base_res, t_eval)))
            with pager or contextlib.nullcontext():
                res = train_loop(model, tok_data, cfg, run, resume_state, monitor, pager, stop, dist)
            paging_stats = dict(pager.stats()) if pager is not None else None
            if res["interrupted"] is not None:
                return res, None, paging_stats, t_eval
            if dist.is_main:
                save_adapter(model, tok, run)
            if do_eval:
                _mark(monitor, "eval")
                tuned_res = _evaluate(evaluator, model, tok, tuned=True)
                t_eval += tuned_res["seconds"]
        finally:
            monitor.stop()
    return res, tuned_res, paging_stats, t_eval


def run_training(cfg: TrainConfig, place: RunPlace, inputs: Inputs, resume: str | None, guard=None,
                 dist: Dist = SINGLE) -> int:
    from forge_rt.train import report
    from forge_rt.sovereign.passphrase import get_passphrase
    t_all = time.time()
    passphrase = get_passphrase(confirm=True, what="passphrase to seal the adapter") if cfg.seal else None
    model, tok, tok_data, summary, data_info = _prepare(cfg, place.path, inputs, dist)
    res, tuned_res, paging_stats, t_eval = _train_and_eval(model, tok, tok_data, inputs, cfg, place.path, resume,
                                                           data_info, dist)
    if res["interrupted"] is not None:
        # [distributed] no rank exits before rank 0's checkpoint is down (torchrun then stops the rest)
        dist.barrier("the interrupt checkpoint")
        print(f"interrupted at step {res['steps']}/{res['total_steps']}; checkpoint written. "
              f"Continue with: python -m forge_rt.train --resume {place.path}", flush=True)
        return 128 + int(res["interrupted"])
    dist.barrier("the end of training")  # [distributed] every memory record is closed before rank 0 reports
    if not dist.is_main:
        return 0
    if place.replaces is not None:
        place.swap_in()  # the new run has its adapter: only now does it replace the old one
    run = place.path
    base_path = run / "eval_base.json"
    base_res = json.loads(base_path.read_text()) if base_path.exists() else None
    memory_plan, rss_cap = data_info.pop("memory_plan"), data_info.pop("rss_cap")
    metrics = report.build_metrics(cfg, res, base_res, _jsonable(tuned_res, None) if tuned_res else None,
                                   data=data_info, scrub=inputs.scrub, paging=paging_stats, fused_summary=summary,
                                   eval_time_s=t_eval, total_time_s=time.time() - t_all)
    metrics["memory_plan"] = memory.plan_record(memory_plan, res, rss_cap)
    metrics["eval"] = eval_record(base_res, tuned_res)
    if inputs.canaries:
        from forge_rt.privacy.runaudit import audit_run, save_canaries
        save_canaries(run / "audit", inputs.canaries)
        print(f"audit: {len(inputs.canaries)} canaries against {cfg.audit_candidates} candidates each, base and tuned ...",
              flush=True)
        metrics["audit"] = audit_run(model, tok, inputs.canaries, run / "audit", cfg.audit_candidates, cfg.seed,
                                     cfg.max_len)
    metrics["exports"] = deliver.export(cfg, run, inputs.evals, metrics.get("score_tuned"), tuned=(model, tok_data))
    deliver.finish_sovereign(cfg, run, inputs.train_path, passphrase, metrics)
    if guard is not None:
        metrics["egress_attempts"] = len(guard.attempts)
        metrics["egress"] = guard.report()["summary"]
        metrics["egress_allowed"] = guard.allowed()
    metrics["distributed"] = ({"ranks": dist.world, "backend": dist.backend, "rendezvous": dist.master}
                              if dist.enabled else None)
    from forge_rt.sovereign import isolate
    metrics["isolated"] = isolate.inside()  # --isolate: the kernel's network namespace, not only the guard
    report.write_run_report(run, metrics, read_metrics(run / "metrics.jsonl"))
    print(report.summary_line(metrics), flush=True)
    print(f"run: {run}", flush=True)
    return 0


def _jsonable(res: dict, seconds: float | None) -> dict:
    out = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    if seconds is not None:
        out["eval_time_s"] = seconds
    return out
