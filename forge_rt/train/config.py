"""Training configuration: defaults < config file (TOML/YAML) < command-line flags.

One dataclass holds every knob; the CLI and the config file are both derived from it, so a config
file can hold any flag and the resolved config saved with a run is complete."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forge_rt.core.atomic import write_atomic
from forge_rt.core.errors import ForgeError
from forge_rt.data.formats import PROMPT_FORMATS
from forge_rt.models.build import LoraSpec
from forge_rt.plan.estimate import SizeError, parse_bytes


class ConfigError(ForgeError, ValueError):
    pass


@dataclass
class TrainConfig:
    # Inputs and outputs.
    model: str | None = field(default=None, metadata=dict(help="HF model directory or .gguf file (default: shipped SmolLM2-135M-Instruct GGUF)"))
    data: str | None = field(default=None, metadata=dict(help="training data, JSON/JSONL (alpaca, chat messages or prompt/completion); default: shipped demo"))
    eval_data: str | None = field(default=None, metadata=dict(help="held-out data for the before/after evaluation (default: demo eval set when training on the demo)"))
    retention_text: str | None = field(default=None, metadata=dict(help="general text whose perplexity guards against forgetting (default: shipped sample)"))
    output: str | None = field(default=None, metadata=dict(help="run directory (default: runs/<timestamp>)"))
    overwrite: bool = field(default=False, metadata=dict(help="replace an existing output directory"))
    # LoRA.
    lora_r: int = field(default=16, metadata=dict(help="LoRA rank"))
    lora_alpha: float = field(default=32.0, metadata=dict(help="LoRA alpha (scaling = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=dict(help="dropout on the LoRA input"))
    target_modules: str = field(default="all-linear", metadata=dict(help="'all-linear' or comma-separated module names (q_proj,v_proj,...)"))
    prompt_format: str = field(default="model", metadata=dict(help="how rows become text: model (the tokenizer's chat template; a base model without one gets plain for prompt/completion rows, alpaca otherwise), chatml (needs its tokens in the vocabulary), alpaca, plain (prompt + completion as written)", choices=list(PROMPT_FORMATS)))
    # Optimisation.
    lr: float = field(default=4e-4, metadata=dict(help="peak learning rate (AdamW, cosine by default)"))
    weight_decay: float = field(default=0.0, metadata=dict(help="AdamW weight decay"))
    schedule: str = field(default="cosine", metadata=dict(help="learning-rate schedule", choices=["cosine", "linear", "constant"]))
    warmup_steps: int = field(default=6, metadata=dict(help="linear warm-up steps"))
    epochs: float = field(default=1.0, metadata=dict(help="passes over the training data (ignored when --max-steps is set)"))
    # 40 x 8 rows: the demo's convergence study (bench/results/convergence) scores 41.75 at 40 steps, 45.25 at 80
    # (+6 minutes here); 40 keeps the whole default command within 12 minutes on a 2-core CPU
    max_steps: int | None = field(default=40, metadata=dict(help="optimizer steps; 0 or unset means use --epochs"))
    batch_size: int = field(default=8, metadata=dict(help="examples per micro-batch"))
    grad_accum: int = field(default=1, metadata=dict(help="micro-batches per optimizer step"))
    max_grad_norm: float = field(default=1.0, metadata=dict(help="gradient clipping norm (0 disables)"))
    max_len: int = field(default=320, metadata=dict(help="maximum tokens per example (longer ones are truncated and counted)"))
    pack: bool = field(default=False, metadata=dict(help="pack several examples per sequence"))
    seed: int = field(default=0, metadata=dict(help="random seed (data order, LoRA init, dropout)"))
    grad_checkpointing: bool = field(default=False, metadata=dict(help="always recompute activations in backward (else --memory decides)"))
    # forge_rt native paths.
    no_fused: bool = field(default=False, metadata=dict(help="stock PEFT LoRA on the full-precision model: no NF4 quantization, no fused kernels"))
    no_paging: bool = field(default=False, metadata=dict(help="keep autograd's saved activations uncompressed in memory"))
    paging_budget: str | None = field(default=None, metadata=dict(help="page saved activations, spilling to disk past this resident size, e.g. 512M or 2G (default: --memory decides)"))
    memory: str = field(default="auto", metadata=dict(help="memory plan: auto (least memory within 40%% of the fastest step, or the fastest that fits --memory-budget), speed (no recomputation), min (least memory)", choices=["auto", "speed", "min"]))
    export: str | None = field(default=None, metadata=dict(help="write deployable exports at the end, comma-separated: gguf (merged, llama.cpp), gguf-lora (llama.cpp adapter), gguf-base (the base as trained, for that adapter), hf (merged HF directory)"))
    export_quant: str = field(default="f16", metadata=dict(help="GGUF tensor type of --export gguf/gguf-lora/gguf-base (K-quants: llama.cpp's per-tensor mix; gguf-lora takes f16, bf16, q8_0)", choices=["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k"]))
    imatrix: bool = field(default=False, metadata=dict(help="after training, one no-grad pass of the (scrubbed) training data through the tuned model collects an importance matrix (per-column mean squared input of every linear), written to RUN/export/imatrix.dat in llama.cpp's format and used to quantize --export gguf/gguf-base; needs a quantized --export-quant, e.g. q4_k_m"))
    memory_budget: str | None = field(default=None, metadata=dict(help="memory the run may use, e.g. 4G: the planner fits its choice under it"))
    no_rss_cap: bool = field(default=False, metadata=dict(help="let the heap keep what training frees (faster on machines with slow page faults; RSS then ends far above the planner's prediction)"))
    # Run control and reporting.
    checkpoint_every: int = field(default=50, metadata=dict(help="write a checkpoint every N optimizer steps (0: only at the end / on interrupt)"))
    log_every: int = field(default=10, metadata=dict(help="plain progress line every N steps when not on a terminal"))
    no_live: bool = field(default=False, metadata=dict(help="no live progress/memory panel; plain log lines"))
    no_eval: bool = field(default=False, metadata=dict(help="skip the before/after evaluation"))
    eval_limit: int | None = field(default=None, metadata=dict(help="evaluate on the first N held-out examples only"))
    eval_batch_size: int = field(default=32, metadata=dict(help="generation batch size for the evaluation"))
    max_new_tokens: int = field(default=64, metadata=dict(help="greedy tokens generated per evaluation example"))
    eval_engine: str = field(default="auto", metadata=dict(help="what generates the evaluation's answers: llamacpp (the base as trained + this run's adapter as GGUFs, --eval-batch-size sequences decoded at once; needs xllamacpp), pytorch (HF generate), auto (llamacpp when xllamacpp is installed and the architecture exports to GGUF)", choices=["auto", "llamacpp", "pytorch"]))
    # Sovereign data handling.
    scrub: str = field(default="mask", metadata=dict(help="PII scrubbing of training text before tokenization", choices=["mask", "hash", "drop-row", "off"]))
    seal: bool = field(default=False, metadata=dict(help="encrypt the adapter at the end (passphrase from FORGE_RT_PASSPHRASE or a prompt) and remove the plaintext"))
    shred_data: bool = field(default=False, metadata=dict(help="overwrite and delete the training data files after a successful run"))
    isolate: bool = field(default=False, metadata=dict(help="run in a new network namespace (only loopback): the kernel blocks egress, C libraries included"))
    scrub_ner: bool = field(default=False, metadata=dict(help="also scrub names of people, organisations and places (offline spaCy model; pip install 'forge_rt[ner]')"))
    # Differential privacy of the LoRA weights and the canary audit (forge_rt.privacy).
    dp_epsilon: float | None = field(default=None, metadata=dict(help="train with differential privacy at this epsilon: per-example clipping of the LoRA gradients, Gaussian noise calibrated to the run's steps, Poisson-sampled batches of expected size --dp-batch (LoRA dropout is then off)"))
    dp_noise: float | None = field(default=None, metadata=dict(help="DP with this noise multiplier sigma instead of a target --dp-epsilon (the epsilon spent is reported)"))
    dp_delta: float = field(default=1e-5, metadata=dict(help="DP delta (must be below 1/number of examples)"))
    dp_clip: float = field(default=1.0, metadata=dict(help="DP per-example gradient norm bound C"))
    dp_batch: int | None = field(default=None, metadata=dict(help="DP: expected size of a step's Poisson sample (default --batch-size), run in micro-batches of --batch-size with one noise draw per step; the noise per example falls as this grows: the lever for the score at a fixed epsilon"))
    dp_accountant: str = field(default="rdp", metadata=dict(help="privacy accountant (Opacus): rdp or prv", choices=["rdp", "prv"]))
    audit: bool = field(default=False, metadata=dict(help="canary audit: insert random secrets at 1/4/16 repetitions into a copy of the training rows, and measure their exposure and extraction on the base and tuned models (this run's adapter then holds the canaries: keep it for the audit only)"))
    audit_candidates: int = field(default=1000, metadata=dict(help="random candidates each canary is ranked against (exposure can show at most log2 of this + 1 bits)"))
    # Data-parallel runs under torchrun (docs/distributed.md).
    dist_backend: str = field(default="auto", metadata=dict(help="torch.distributed backend under torchrun: auto (nccl with a GPU, else gloo)", choices=["auto", "gloo", "nccl"]))
    dist_timeout: float = field(default=300.0, metadata=dict(help="seconds a rank waits for the others before it gives up with an error (a dead rank is noticed at once)"))

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number (got {value})")
        for name, low in _MINIMUM.items():
            value = getattr(self, name)
            if value is not None and value < low:
                why = f": {_WHY[name]}" if name in _WHY else ""
                raise ConfigError(f"{name} must be >= {low} (got {value}){why}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"lr must be in (0, 1] (got {self.lr}); typical values are 1e-5 to 1e-3")
        if (self.max_steps or 0) == 0 and self.epochs <= 0:
            raise ConfigError("set --max-steps > 0 or --epochs > 0")
        if self.scrub_ner and self.scrub == "off":
            raise ConfigError("--scrub-ner scrubs names on top of --scrub; use it with --scrub mask, hash or drop-row")
        if self.target_modules != "all-linear" and not [s for s in self.target_modules.split(",") if s.strip()]:
            raise ConfigError(f"target_modules {self.target_modules!r} names no module; use 'all-linear' or e.g. q_proj,v_proj")
        kinds = [k.strip() for k in (self.export or "").split(",") if k.strip()]
        if self.export is not None and (not kinds or set(kinds) - {"gguf", "gguf-lora", "gguf-base", "hf"}):
            raise ConfigError(f"--export {self.export!r}: give a comma-separated list of gguf, gguf-lora, gguf-base, hf")
        if "gguf-lora" in kinds and self.export_quant not in ("f16", "bf16", "q8_0"):
            raise ConfigError(f"--export gguf-lora with --export-quant {self.export_quant}: an adapter is f16, bf16 or "
                              "q8_0; export the adapter in one of those, or drop gguf-lora")
        if self.imatrix and (not {"gguf", "gguf-base"} & set(kinds) or self.export_quant in ("f16", "bf16")):
            raise ConfigError("--imatrix weights the quantizer of the merged export: add --export gguf (or gguf-base) "
                              "and a quantized --export-quant, e.g. q4_k_m")
        for name in ("paging_budget", "memory_budget"):
            if getattr(self, name) is not None:
                try:
                    parse_bytes(getattr(self, name), name)
                except SizeError as exc:
                    raise ConfigError(str(exc)) from None
        if self.dp or self.dp_batch is not None:
            self.dp_settings().check(self.pack, self.grad_accum)

    @property
    def dp(self) -> bool:
        return self.dp_epsilon is not None or self.dp_noise is not None

    def dp_settings(self):
        from forge_rt.privacy.session import DPSettings
        return DPSettings(self.dp_epsilon, self.dp_noise, self.dp_delta, self.dp_clip, self.dp_accountant)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def lora_spec(self) -> LoraSpec:
        # under DP, no LoRA dropout: its mask is drawn inside the fused op, and per-example gradients need it
        return LoraSpec(r=self.lora_r, alpha=self.lora_alpha, dropout=0.0 if self.dp else self.lora_dropout,
                        target_modules=self.target_modules, fused=not self.no_fused)


# Smallest accepted value of each numeric knob, and why (for the error message).
_MINIMUM = {"lora_r": 1, "lora_alpha": 1e-6, "batch_size": 1, "grad_accum": 1, "max_len": 2, "eval_batch_size": 1,
            "max_new_tokens": 1, "weight_decay": 0.0, "warmup_steps": 0, "max_steps": 0, "epochs": 0.0,
            "max_grad_norm": 0.0, "checkpoint_every": 0, "log_every": 1, "eval_limit": 1, "seed": 0, "dp_batch": 1,
            "dist_timeout": 1.0, "dp_epsilon": 1e-6, "dp_noise": 1e-6, "dp_clip": 1e-12, "audit_candidates": 1}
_WHY = {"max_len": "an example needs a prompt token and a response token",
        "max_steps": "0 means use --epochs; a negative count would train nothing and save an untrained adapter",
        "log_every": "progress is printed every N steps",
        "weight_decay": "a negative decay pushes weights away from zero",
        "max_grad_norm": "0 disables clipping", "dp_noise": "without noise there is no privacy to account", "checkpoint_every": "0 means only at the end / on interrupt"}

def _bool_flag(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                        default=argparse.SUPPRESS, help=_help(f))


def _help(f: dataclasses.Field) -> str:
    # argparse %-formats help strings: a literal % must be doubled.
    return f.metadata["help"].replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m forge_rt.train",
        description="Offline QLoRA fine-tuning with forge_rt's fused NF4 kernels and activation paging. "
                    "With no arguments: SmolLM2-135M-Instruct on the shipped telemetry-triage demo, evaluated before/after.")
    p.add_argument("--config", default=None, help="TOML or YAML file holding any of these flags (flags given here win)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        if f.type == "bool":
            _bool_flag(p, f)
            continue
        base = f.type.split("|")[0].strip()
        kw = dict(dest=f.name, default=argparse.SUPPRESS, type=types[base], help=_help(f))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def _coerce(name: str, value: Any, source: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    if value is None:
        if "None" not in f.type:
            raise ConfigError(f"{source}: {name} cannot be empty")
        return None
    base = f.type.split("|")[0].strip()
    value = _number_from_text(value, base, name, source)
    ok = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[base]
    if not isinstance(value, ok) or (base in ("int", "float") and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be {base}, got {type(value).__name__} {value!r}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ConfigError(f"{source}: {name} must be one of {f.metadata['choices']}, got {value!r}")
    return float(value) if base == "float" else value


def _number_from_text(value: Any, base: str, name: str, source: str) -> Any:
    """A number written as text ("1e-4": YAML 1.1 reads an exponent without a dot as a string) -> the number."""
    if base not in ("int", "float") or not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{source}: {name} must be {base}, got the text {value!r}") from None
    if base == "int":
        if not number.is_integer():
            raise ConfigError(f"{source}: {name} must be a whole number, got {value!r}")
        return int(number)
    return number


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a TOML (.toml) or YAML (.yaml/.yml) file of flag values; keys use - or _."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {p}: use a .toml, .yaml/.yml or .json file")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a UTF-8 BOM (Windows editors) is accepted
        if p.suffix == ".toml":
            import tomllib  # stdlib from Python 3.11; YAML works everywhere
            raw = tomllib.loads(text)
        elif p.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = yaml.safe_load(text) or {}
    except PermissionError:
        raise ConfigError(f"config file {p}: permission denied; make it readable (chmod u+r {p})") from None
    except (ValueError, OSError, yaml.YAMLError) as exc:  # tomllib/json errors are ValueErrors
        raise ConfigError(f"config file {p} could not be parsed: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a table/mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"config file {p}: unknown key {key!r}; valid keys are the train flags, e.g. lora_r, lr, max_steps")
        out[name] = _coerce(name, value, f"config file {p}")
    return out


def resolve(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """(config, resume_dir) from argv: defaults, then the --config file, then explicit flags."""
    ns = vars(build_parser().parse_args(argv))
    config_path = ns.pop("config", None)
    resume = ns.pop("resume", None)
    values: dict[str, Any] = {}
    if resume is not None:
        saved = Path(resume) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume {resume}: no config.json there; is it a forge_rt run directory?")
        values.update(load_config_file(saved))
    requested = dict(ns)
    if config_path is not None:
        requested = {**load_config_file(config_path), **requested}
    if resume is not None:
        check_resume_changes(values, requested, resume)
    values.update(requested)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg, resume


# What --resume may change: how the run is watched, evaluated and finished, never the trained model or
# the data order (a field added to TrainConfig is refused on resume until it is listed here).
RESUME_MAY_CHANGE = frozenset({
    "output", "overwrite", "eval_data", "retention_text", "no_paging", "paging_budget", "grad_checkpointing",
    "checkpoint_every", "log_every", "no_live", "no_eval", "eval_limit", "eval_batch_size", "max_new_tokens", "eval_engine",
    "seal", "shred_data", "isolate", "memory", "memory_budget", "no_rss_cap", "export", "export_quant", "imatrix",
    "dist_backend", "dist_timeout", "audit_candidates"})  # the number of ranks is not a flag: the global batch fixes the result


def check_resume_changes(saved: dict[str, Any], requested: dict[str, Any], resume: str) -> None:
    """Refuses, before anything is written, a resume whose flags would change the model, the optimizer's
    trajectory or the data order of the saved run."""
    changed = [k for k, v in requested.items()
               if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v]
    if changed:
        what = ", ".join(f"{k} {saved[k]!r} -> {requested[k]!r}" for k in sorted(changed))
        raise ConfigError(f"--resume {resume}: cannot change {what} (it alters the model or the data order of the "
                          "saved run); drop those flags to continue it, or start a new run with --output")


def save_config(cfg: TrainConfig, path: Path) -> None:
    write_atomic(path, cfg.to_json() + "\n", mode=0o600)
