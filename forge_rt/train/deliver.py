"""What a finished run hands over: --export files scored in llama.cpp, --seal and --shred-data."""
from __future__ import annotations

from pathlib import Path

from forge_rt.train.config import TrainConfig


EXPORT_NAMES = {"gguf": "model-{quant}.gguf", "gguf-lora": "adapter-{quant}.gguf", "gguf-base": "base-{quant}.gguf",
                "hf": "hf"}


def export(cfg: TrainConfig, run: Path, evals, pytorch_score: float | None = None, tuned=None) -> list[dict] | None:
    """--export: the deployable files under RUN/export/ (before --seal shreds the plaintext adapter), each
    GGUF scored in llama.cpp on the held-out set when the run evaluates, beside `pytorch_score` (the tuned
    model's score in PyTorch): a gap over report.GAP_WARN_POINTS is said loudly, here and in the report.
    `tuned`: (tuned model, its tokenized training data), for --imatrix."""
    if not cfg.export:
        return None
    from forge_rt.export import export_run
    kinds = [k.strip() for k in cfg.export.split(",") if k.strip()]
    targets = {k: run / "export" / EXPORT_NAMES[k].format(quant=cfg.export_quant) for k in kinds}
    (run / "export").mkdir(exist_ok=True)
    imatrix = _imatrix(cfg, run, tuned) if cfg.imatrix else None
    print(f"export: {', '.join(kinds)} ...", flush=True)
    records = export_run(run, targets, quant=cfg.export_quant, imatrix=imatrix and imatrix["path"])
    if imatrix:
        for rec in records:
            rec["imatrix"] = imatrix if rec["kind"] in ("gguf", "gguf-base") else None
    if evals is not None:
        _score_exports(records, evals, cfg.max_new_tokens)
        _check_gaps(records, pytorch_score)
    return records


def _imatrix(cfg: TrainConfig, run: Path, tuned) -> dict:
    """--imatrix: the tuned model's importance matrix from the run's scrubbed training data, RUN/export/imatrix.dat."""
    from forge_rt.export.imatrix import ImatrixError
    from forge_rt.export.imatrix_collect import write_run_imatrix
    model, tok_data = tuned if tuned is not None else (None, None)
    if model is None or not getattr(tok_data, "input_ids", None):
        raise ImatrixError("--imatrix: no training data reached the end of the run to collect activations from")
    print(f"imatrix: one pass over {len(tok_data.input_ids)} training sequences ...", flush=True)
    return write_run_imatrix(model, tok_data.input_ids, run / "export" / "imatrix.dat", dataset=str(cfg.data or "demo"))


def _check_gaps(records: list[dict], pytorch_score: float | None) -> None:
    from forge_rt.train.report import GAP_WARN_POINTS
    for rec in records:
        s = rec.get("llamacpp") or {}
        if pytorch_score is None or "score" not in s:
            continue
        s["gap_vs_pytorch"] = s["score"] - pytorch_score
        if abs(s["gap_vs_pytorch"]) > GAP_WARN_POINTS:
            print(f"WARNING: export {rec['kind']} scores {s['score']:.1f} in llama.cpp against {pytorch_score:.1f} in "
                  "PyTorch: it does not reproduce the trained model (check the architecture's GGUF conversion, "
                  "or try a higher --export-quant)", flush=True)


def _score_exports(records: list[dict], evals, max_new_tokens: int) -> None:
    """The score of exactly what is deployed: a merged GGUF alone, a gguf-lora adapter over the gguf-base of
    the same export (else over the base GGUF it was trained from); needs xllamacpp (forge_rt[export])."""
    from forge_rt.eval.llamacpp import LlamaCppError, evaluate_gguf
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


def finish_sovereign(cfg: TrainConfig, run: Path, train_path: Path, passphrase: str | None, metrics: dict) -> None:
    """--seal: encrypt adapter/ to adapter.sealed, then shred the plaintext adapter and the checkpoints
    (they hold the same weights). --shred-data: shred the training file (never the shipped demo)."""
    from forge_rt.sovereign import shred
    if cfg.seal:
        from forge_rt.sovereign import seal
        from forge_rt.models import run_identity
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
