"""What a run reads, checked and scrubbed before the run directory is touched or any model loads: the
training and held-out examples and the retention text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge_rt import data
from forge_rt.data import formats
from forge_rt.data.formats import PromptFormat
from forge_rt.models.load import load_tokenizer
from forge_rt.train.config import TrainConfig
from forge_rt.train.place import RunError


@dataclass
class Inputs:
    """Everything a run reads, checked and scrubbed before any model is loaded."""
    train_path: Path
    train: list
    evals: list | None
    retention: str
    scrub: dict
    prompt: PromptFormat | None = None   # how rows become text (data.formats), resolved with the tokenizer
    tokenizer: object = None             # the base model's, loaded once (the model loads after the run dir)
    canaries: list | None = None         # --audit: the canaries inserted into the training rows (privacy.canary)


def load_inputs(cfg: TrainConfig) -> Inputs:
    """Training/eval examples and retention text, checked and scrubbed before the run directory is touched."""
    demo = data.demo_paths()
    train_path = Path(cfg.data) if cfg.data else demo["train"]
    eval_path = Path(cfg.eval_data) if cfg.eval_data else (demo["eval"] if cfg.data is None else None)
    retention_path = Path(cfg.retention_text) if cfg.retention_text else demo["retention"]
    train = data.load_examples(train_path)
    evals = data.load_examples(eval_path) if (eval_path is not None and not cfg.no_eval) else None
    if evals is not None and cfg.eval_limit:
        evals = data.Examples(evals[: cfg.eval_limit], evals.format, evals.path)
    retention = data.read_text(retention_path, "retention text", "--retention-text")
    canaries = None
    if cfg.audit:  # inserted before scrubbing, so --scrub meets the canaries in formats it recognises
        from forge_rt.privacy.runaudit import with_canaries
        rows, canaries = with_canaries(list(train), cfg.seed)
        train = data.Examples(rows, train.format, train.path)
    inputs = Inputs(train_path, *scrub_inputs(train, evals, retention, cfg.scrub, cfg.scrub_ner), canaries=canaries)
    inputs.tokenizer = load_tokenizer(cfg.model)
    inputs.prompt = formats.resolve(cfg.prompt_format, inputs.tokenizer, train.format)
    return inputs


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
    rows = scrubber.scrub_rows(examples)
    if not rows:
        raise data.DataError(examples.path, None, None, f"every row was dropped by --scrub {mode}",
                        "use --scrub mask, or clean the data")
    return data.Examples(rows, examples.format, examples.path)
