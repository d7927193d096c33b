"""One training run, orchestrated: check the inputs, prepare the run directory, build the model,
evaluate the base, train, save, evaluate the tuned model, seal/shred, write the report."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from forge_rt.errors import ForgeError
from forge_rt.train import checkpoint as ckpt
from forge_rt.train.config import TrainConfig, parse_bytes, save_config
from forge_rt.train.console import Stop
from forge_rt.train.distributed import SINGLE, Dist
from forge_rt.train.loop import _mark, read_metrics, train_loop


class RunError(ForgeError, RuntimeError):
    """A problem with the run itself (output directory, resume state), reported without a traceback."""


@dataclass
class RunPlace:
    """Where a run writes. With --overwrite it is built beside the old run (`replaces`), which is swapped out
    only once the new run has its adapter; a run that fails before its first checkpoint leaves no trace."""
    path: Path
    replaces: Path | None = None
    created: bool = False   # this invocation made the directory

    def swap_in(self) -> None:
        old = self.replaces.with_name(self.replaces.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(self.replaces, old)
        os.rename(self.path, self.replaces)
        shutil.rmtree(old)
        self.path, self.replaces = self.replaces, None

    def discard_if_empty(self) -> str:
        """After a failure: removes a new run that holds nothing resumable; says what is left where."""
        if self.replaces is None and not self.created:
            return ""
        untouched = f"; the previous run in {self.replaces} is untouched" if self.replaces else ""
        if ckpt.latest_checkpoint(self.path / "checkpoints") is not None:
            return f"; the new run's checkpoints are in {self.path}{untouched}"
        shutil.rmtree(self.path, ignore_errors=True)
        return untouched


def prepare_run_dir(cfg: TrainConfig, resume: str | None) -> RunPlace:
    if resume is not None:
        run = Path(resume)
        for name in ckpt.clean_partial(run / "checkpoints"):
            print(f"resume: removed the half-written checkpoint {run / 'checkpoints' / name}", flush=True)
        if ckpt.latest_checkpoint(run / "checkpoints") is None:
            raise RunError(f"--resume {run}: no checkpoint in {run / 'checkpoints'}; start a new run instead")
        return RunPlace(run)
    run = Path(cfg.output) if cfg.output else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    replaces = None
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        if not cfg.overwrite:
            raise RunError(f"output directory {run} exists; pass --overwrite to replace it or --resume {run} to continue it")
        if not run.is_dir():
            raise RunError(f"--output {run} is a file, not a directory; choose another --output")
        replaces, run = run, run.with_name(run.name + ".new")
        shutil.rmtree(run, ignore_errors=True)  # a leftover of an earlier --overwrite that failed
    place = RunPlace(run, replaces, created=not run.exists() or not any(run.iterdir()))
    try:
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        run.chmod(0o700)
        (run / "run_id").write_text(uuid.uuid4().hex + "\n")
    except OSError as exc:
        raise RunError(f"cannot write the run directory {run}: {exc.strerror or exc}; "
                       "choose a writable --output") from None
    return place


def share_run_dir(cfg: TrainConfig, resume: str | None, dist: Dist) -> RunPlace:
    """[distributed] prepare_run_dir on rank 0; the other ranks get its path only (rank 0 alone may swap or
    discard it) and make it where it is missing (another node), for their memory record."""
    place = dist.from_main(lambda: prepare_run_dir(cfg, resume), "the run directory's preparation")
    if dist.is_main:
        return place
    place.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return RunPlace(place.path)


@contextlib.contextmanager
def offline_guard(allow=()):
    """forge_rt.sovereign.offline(): blocks egress (but to loopback and the `allow` hosts) and puts the hub
    libraries in offline mode."""
    from forge_rt.sovereign import offline
    with offline(allow) as guard:
        yield guard


@dataclass
class Inputs:
    """Everything a run reads, checked and scrubbed before any model is loaded."""
    train_path: Path
    train: list
    evals: list | None
    retention: str
    scrub: dict


def load_inputs(cfg: TrainConfig) -> Inputs:
    """Training/eval examples and retention text, checked and scrubbed before the run directory is touched."""
    from forge_rt.train import data
    demo = data.demo_paths()
    train_path = Path(cfg.data) if cfg.data else demo["train"]
    eval_path = Path(cfg.eval_data) if cfg.eval_data else (demo["eval"] if cfg.data is None else None)
    retention_path = Path(cfg.retention_text) if cfg.retention_text else demo["retention"]
    train = data.load_examples(train_path)
    evals = data.load_examples(eval_path) if (eval_path is not None and not cfg.no_eval) else None
    if evals is not None and cfg.eval_limit:
        evals = data.Examples(evals[: cfg.eval_limit], evals.format, evals.path)
    retention = data.read_text(retention_path, "retention text", "--retention-text")
    return Inputs(train_path, *scrub_inputs(train, evals, retention, cfg.scrub, cfg.scrub_ner))


def scrub_inputs(train, evals, retention: str, mode: str, ner: bool = False):
    """Scrubs PII/secrets from every text that enters the run (training and held-out rows, retention text)
    with one Scrubber, so a value gets the same placeholder everywhere. Returns (train, evals, retention,
    counts-only report). `ner` adds names, organisations and places (MissingExtra without the `ner` extra)."""
    if mode == "off":
        return train, evals, retention, {"mode": "off"}
    from forge_rt.sovereign.scrub import Scrubber
    scrubber = Scrubber(mode=mode, ner=ner)
    train = _scrub_rows(scrubber, train, mode)
    evals = _scrub_rows(scrubber, evals, mode) if evals is not None else None
    # Line by line, so drop-row drops only the lines that hold something.
    kept = (scrubber.scrub(line)[0] for line in retention.split("\n"))
    retention = "\n".join(line for line in kept if line is not None)
    if not retention.strip():
        raise RunError(f"--scrub {mode} removed the whole retention text; use --scrub mask or another --retention-text")
    return train, evals, retention, {**scrubber.report(), "scope": ["train", "eval", "retention"]}


def _scrub_rows(scrubber, examples, mode: str):
    from forge_rt.train.data import DataError, Examples
    rows = scrubber.scrub_rows(examples)
    if not rows:
        raise DataError(examples.path, None, None, f"every row was dropped by --scrub {mode}",
                        "use --scrub mask, or clean the data")
    return Examples(rows, examples.format, examples.path)


def _start_monitor(run: Path, pager, dist: Dist):
    from forge_rt.monitor import MemoryMonitor
    mon = MemoryMonitor(interval=0.1, out_path=run / dist.memory_name, paging=pager)
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


def _memory_plan(cfg: TrainConfig, base, tok_data, run: Path, dist: Dist = SINGLE):
    """The planner's choice for this model and data (None for the stock --no-fused baseline), applied:
    gradient checkpointing on the base model when chosen or forced with --grad-checkpointing."""
    memory_plan = None
    if not cfg.no_fused:
        from forge_rt.plan import Shapes, plan
        from forge_rt.plan.probe import probe
        from forge_rt.train.loop import batch_shape
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


def _cap_rss(base, memory_plan):
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


def _evaluate(model, tok, evals, retention, cfg: TrainConfig, dist: Dist) -> dict:
    from forge_rt.train.evaluate import evaluate  # eval mode, no_grad and timing are evaluate()'s own
    return evaluate(model, tok, evals, retention, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                    dist=dist)


def _prepare(cfg: TrainConfig, run: Path, inputs: Inputs, dist: Dist):
    """Model loaded and built, data tokenized; returns what the run needs."""
    from forge_rt.train.data import tokenize_examples
    from forge_rt.train.model import build_model, load_model
    train, evals = inputs.train, inputs.evals
    print(f"data: {len(train)} training examples ({getattr(train, 'format', '?')} format) from {inputs.train_path}"
          + (f"; {len(evals)} held-out" if evals is not None else ""), flush=True)
    if dist.is_main:
        save_config(cfg, run / "config.json")

    torch.manual_seed(cfg.seed)
    base, tok = load_model(cfg.model, nf4=not cfg.no_fused)
    tok_data = tokenize_examples(train, tok, cfg.max_len, pack=cfg.pack)
    n_trunc = int(getattr(tok_data, "n_truncated", 0))
    if n_trunc:
        print(f"data: {n_trunc} of {len(train)} examples are longer than max_len={cfg.max_len} tokens and were truncated",
              flush=True)
    memory_plan = _memory_plan(cfg, base, tok_data, run, dist)
    torch.manual_seed(cfg.seed)  # LoRA init
    model = build_model(base, cfg)
    rss_cap = None if cfg.no_rss_cap else _cap_rss(base, memory_plan)
    summary = getattr(model, "forge_rt_summary", None)
    if summary:
        print(f"fused: {summary['accelerated']} LoRA layers fused, stock path: {summary['skipped'] or 'none'}",
              flush=True)
    data_info = {"format": getattr(train, "format", None), "n_train": len(train),
                 "n_eval": len(evals) if evals is not None else 0, "n_truncated": n_trunc,
                 "path": str(inputs.train_path), "memory_plan": memory_plan, "rss_cap": rss_cap}
    return model, tok, tok_data, summary, data_info


def save_adapter(model, tok, run: Path) -> None:
    """adapter/ and tokenizer/, each written under a temporary name and renamed into place: a full disk
    leaves no half-written adapter, and the final checkpoint still holds the weights."""
    from safetensors import SafetensorError
    for name, obj in (("adapter", model), ("tokenizer", tok)):
        final, tmp = run / name, run / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            obj.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        except (OSError, SafetensorError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            last = ckpt.latest_checkpoint(run / "checkpoints")
            raise RunError(f"could not write {final} ({getattr(exc, 'strerror', None) or exc}); the final checkpoint "
                           f"{last} is intact: free disk space and run python -m forge_rt.train --resume {run} "
                           "to write it") from None


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
    evals, retention = inputs.evals, inputs.retention
    do_eval = not cfg.no_eval and evals is not None
    do_base = dist.broadcast(do_eval and not eval_base_path.exists())
    if not cfg.no_eval and evals is None:
        print("eval: skipped, no --eval-data given for this dataset", flush=True)
    pager = _make_pager(cfg, run, data_info["memory_plan"])
    monitor = _start_monitor(run, pager, dist)
    t_eval, tuned_res, paging_stats = 0.0, None, None
    # From here on SIGINT/SIGTERM end the run cleanly: at once during eval, at a step end in training.
    with Stop() as stop:
        try:
            if do_base:
                print("eval: base model ...", flush=True)
                _mark(monitor, "eval")
                base_res = _evaluate(model, tok, evals, retention, cfg, dist)
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
                print("eval: tuned model ...", flush=True)
                _mark(monitor, "eval")
                tuned_res = _evaluate(model, tok, evals, retention, cfg, dist)
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
    metrics["memory_plan"] = _plan_record(memory_plan, res, rss_cap)
    metrics["exports"] = _export(cfg, run, inputs.evals)
    finish_sovereign(cfg, run, inputs.train_path, passphrase, metrics)
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


EXPORT_NAMES = {"gguf": "model-{quant}.gguf", "gguf-lora": "adapter-{quant}.gguf", "gguf-base": "base-{quant}.gguf",
                "hf": "hf"}


def _export(cfg: TrainConfig, run: Path, evals) -> list[dict] | None:
    """--export: the deployable files under RUN/export/ (before --seal shreds the plaintext adapter), each
    GGUF scored in llama.cpp on the held-out set when the run evaluates."""
    if not cfg.export:
        return None
    from forge_rt.export import export_run
    kinds = [k.strip() for k in cfg.export.split(",") if k.strip()]
    targets = {k: run / "export" / EXPORT_NAMES[k].format(quant=cfg.export_quant) for k in kinds}
    (run / "export").mkdir(exist_ok=True)
    print(f"export: {', '.join(kinds)} ...", flush=True)
    records = export_run(run, targets, quant=cfg.export_quant)
    if evals is not None:
        _score_exports(records, evals, cfg.max_new_tokens)
    return records


def _score_exports(records: list[dict], evals, max_new_tokens: int) -> None:
    """The score of exactly what is deployed: a merged GGUF alone, a gguf-lora adapter over the gguf-base of
    the same export (else over the base GGUF it was trained from); needs xllamacpp (forge_rt[export])."""
    from forge_rt.export.llamacpp import LlamaCppError, evaluate_gguf
    outputs = {r["kind"]: r["output"] for r in records}
    for rec in records:
        if rec["kind"] == "gguf":
            model, lora = rec["output"], None
        elif rec["kind"] == "gguf-lora":
            model, lora = outputs.get("gguf-base") or rec.get("base_gguf_needed"), rec["output"]
        else:
            continue
        if model is None:  # an HF-directory base and no gguf-base asked for: nothing to run the adapter over
            rec["llamacpp"] = {"skipped": "no base GGUF: add gguf-base to --export"}
            continue
        print(f"export: scoring {Path(lora or model).name} in llama.cpp ...", flush=True)
        try:
            res = evaluate_gguf(model, lora, evals, max_new_tokens)
        except LlamaCppError as exc:
            rec["llamacpp"] = {"skipped": str(exc)}
            continue
        rec["llamacpp"] = {k: res[k] for k in ("score", "exact", "field_acc", "valid_json", "n", "seconds")}
        rec["llamacpp"]["model"] = str(model)


def _plan_record(memory_plan, res: dict, rss_cap=None) -> dict | None:
    """What the planner chose and why, its predicted peak beside the measured one, and how often the RSS cap
    trimmed the heap (with the cap it ended at: above the prediction when live memory was)."""
    if memory_plan is None:
        return None
    rec = memory_plan.as_dict()
    rec["measured_peak"] = res["peak_rss_bytes"]
    if rss_cap is not None:
        rec["heap_trims"], rec["rss_cap"] = rss_cap.trims, rss_cap.cap
    return rec


def finish_sovereign(cfg: TrainConfig, run: Path, train_path: Path, passphrase: str | None, metrics: dict) -> None:
    """--seal: encrypt adapter/ to adapter.sealed, then shred the plaintext adapter and the checkpoints
    (they hold the same weights). --shred-data: shred the training file (never the shipped demo)."""
    from forge_rt.sovereign import shred
    if cfg.seal:
        from forge_rt.sovereign import seal
        from forge_rt.train.model import run_identity
        # Bound to this run: load_run refuses it in another run's directory.
        metrics["sealed"] = seal.seal_dir(run / "adapter", run / "adapter.sealed", passphrase, binding=run_identity(run))
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
