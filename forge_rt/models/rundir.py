"""A finished run's directory, read: its config (the base model, how it was adapted), its adapter (plain or
sealed), its tokenizer and its identity; `load_run` rebuilds its model exactly as it was trained."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from forge_rt.core.errors import ForgeError
from forge_rt.models.build import LoraSpec, build_model
from forge_rt.models.load import load_model


class RunDirError(ForgeError):
    """A directory that is not a (finished) run directory."""


class RunDir:
    """A run directory written by `python -m forge_rt.train`, read: the one place that knows its layout."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise RunDirError(f"{self.path} has no config.json; pass a run directory written by python -m forge_rt.train")
        self.config: dict = json.loads(cfg.read_text())

    @property
    def model(self) -> str | None:
        """The base model the run trained (None: the shipped default)."""
        return self.config.get("model")

    @property
    def fused(self) -> bool:
        return not self.config.get("no_fused", False)

    @property
    def tokenizer(self) -> Path | None:
        tok = self.path / "tokenizer"
        return tok if tok.is_dir() else None

    def adapter(self) -> Path:
        """adapter/ (plain) or adapter.sealed; refuses a run that has neither (it did not finish)."""
        plain, sealed = self.path / "adapter", self.path / "adapter.sealed"
        if (plain / "adapter_config.json").is_file():
            return plain
        if sealed.is_file():
            return sealed
        raise RunDirError(f"{self.path} has no adapter/ or adapter.sealed (the run did not finish?); resume it with "
                          f"python -m forge_rt.train --resume {self.path}")

    def lora_spec(self) -> LoraSpec:
        c, d = self.config, LoraSpec()
        return LoraSpec(r=c.get("lora_r", d.r), alpha=c.get("lora_alpha", d.alpha), dropout=c.get("lora_dropout", d.dropout),
                        target_modules=c.get("target_modules", d.target_modules), fused=self.fused)

    def identity(self) -> str:
        """SHA-256 of the run's random id and its resolved config: what a sealed adapter is bound to."""
        return run_identity(self.path)


def run_identity(run: Path) -> str:
    """SHA-256 of a run's random id and its resolved config (config.json as written at the run's start)."""
    run = Path(run)
    ident = (run / "run_id").read_text().strip() if (run / "run_id").is_file() else ""
    config = json.loads((run / "config.json").read_text())
    return hashlib.sha256(json.dumps({"run_id": ident, "config": config}, sort_keys=True).encode()).hexdigest()


def load_tokenizer(path: Path):
    """A tokenizer saved beside an adapter, with the pad token training used (eos when it has none)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_run(run: str | os.PathLike, passphrase_file=None):
    """(model, tokenizer, RunDir) of a finished run, rebuilt exactly as it was trained; the adapter comes
    from adapter/ or, for a sealed run, from adapter.sealed decrypted in memory (checked against the run's
    identity, so another run's sealed adapter is refused)."""
    rd = RunDir(run)
    adapter = rd.adapter()
    phrase = None
    if adapter.is_file():
        from forge_rt.sovereign.passphrase import get_passphrase
        phrase = get_passphrase(passphrase_file, what=f"passphrase for {adapter}")
    base, tok = load_model(rd.model, nf4=rd.fused)
    if rd.tokenizer is not None:
        tok = load_tokenizer(rd.tokenizer)
    if phrase is None:
        model = build_model(base, rd.lora_spec(), adapter_dir=adapter)
    else:
        model = build_model(base, rd.lora_spec(), sealed=adapter, passphrase=phrase, binding=rd.identity())
    return model.eval(), tok, rd
