"""What an export starts from: a run directory, or an adapter (+ base model) with no run directory.

All checks that need no model run first (`resolve`), so bad input fails before any long work; `load`
then rebuilds the adapted model as the run trained it (NF4 base unless the run used --no-fused)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge_rt.core.errors import ForgeError
from forge_rt.models import LoraSpec, ModelLoadError, RunDir, RunDirError, build_model, check_model_path, default_gguf_path
from forge_rt.models.load import load_model
from forge_rt.models.rundir import load_tokenizer


class ExportError(ForgeError, RuntimeError):
    """Bad input or a failed export, reported as one `error:` line."""


@dataclass
class Source:
    run: Path | None           # the run directory, if any
    adapter: Path              # adapter/ directory or adapter.sealed file
    model: Path                # HF directory or .gguf file of the base
    no_fused: bool             # the run trained stock PEFT on the full-precision base
    tokenizer: Path | None     # run's tokenizer/ (else the base model's)

    @property
    def sealed(self) -> bool:
        return self.adapter.is_file()

    @property
    def base_is_gguf(self) -> bool:
        return self.model.is_file()


def resolve(run=None, adapter=None, model=None) -> Source:
    """The export's inputs, checked: a run dir (its config names the base), or --adapter [--model]."""
    if run is None and adapter is None:
        raise ExportError("pass a run directory, or --adapter DIR (with --model PATH for its base)")
    rd = None
    try:
        if run is not None:
            rd = RunDir(run)
            adapter = adapter or rd.adapter()
        adapter = Path(adapter)
        if adapter.is_dir() and not (adapter / "adapter_config.json").is_file():
            raise ExportError(f"{adapter} has no adapter_config.json; pass a PEFT adapter directory or an adapter.sealed file")
        if not adapter.exists():
            raise ExportError(f"adapter {adapter} does not exist")
        base = check_model_path(model or (rd.model if rd else None) or default_gguf_path())
    except (ModelLoadError, RunDirError) as exc:
        raise ExportError(str(exc)) from None
    return Source(rd.path if rd else None, adapter, base, not rd.fused if rd else False, rd.tokenizer if rd else None)


def _check_fits(base, adapter_dir: Path, model_path: Path) -> None:
    """The adapter's LoRA matrices must name modules of this base with matching shapes."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a .bin adapter: PEFT's own load reports mismatches
    modules = dict(base.named_modules())
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            path = key.removeprefix("base_model.model.").split(".lora_")[0]
            mod = modules.get(path)
            shape = f.get_slice(key).get_shape()
            ok = mod is not None and hasattr(mod, "in_features") and (
                shape[1] == mod.in_features if ".lora_A." in key else shape[0] == mod.out_features)
            if not ok:
                raise ExportError(f"adapter {adapter_dir} does not fit base model {model_path}: {key} {tuple(shape)} "
                                  f"has no matching layer; is it the base model the adapter was trained on?")


def shapes_only(model_path: Path):
    """The base model with every parameter a zero-stride view of one zero: its shapes and nothing else
    (what the LoRA layers need to be built over; no weight is read)."""
    import torch
    from torch import nn
    from forge_rt.models.paths import model_config
    from forge_rt.models.stream_load import skeleton

    base = skeleton(model_config(model_path), torch.float32)
    for module in base.modules():
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape),
                                                       requires_grad=False)
    return base


def load(src: Source, passphrase_file=None, weights: bool = True):
    """(PEFT model, tokenizer) of the source, adapter loaded (a sealed one decrypted in memory). Without
    `weights` the base is its shapes only (shapes_only) and the tokenizer None: enough for gguf-lora."""
    phrase = None
    if src.sealed:  # asked before the base model loads (it takes a while)
        from forge_rt.sovereign import seal  # needs the seal extra (cryptography): only for a sealed adapter
        try:
            phrase = seal.get_passphrase(passphrase_file)
            seal.verify(src.adapter, phrase)  # a wrong passphrase or a damaged file fails here, fast
        except seal.SealError as exc:
            raise ExportError(str(exc)) from None
    try:
        if weights:  # as training loaded it: streamed into NF4 (or full precision for a --no-fused run)
            base, tok = load_model(src.model, nf4=not src.no_fused)
        else:
            base, tok = shapes_only(src.model), None
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    if src.tokenizer is not None and weights:
        tok = load_tokenizer(src.tokenizer)
    if not src.sealed:
        _check_fits(base, src.adapter, src.model)
    # a sealed adapter from a run directory must be that run's own (the identity recorded at sealing)
    binding = RunDir(src.run).identity() if src.sealed and src.run is not None else None
    spec = LoraSpec(fused=weights and not src.no_fused)  # the adapter's own config gives rank and targets
    try:
        if src.sealed:
            model = build_model(base, spec, sealed=src.adapter, passphrase=phrase, binding=binding)
        else:
            model = build_model(base, spec, adapter_dir=src.adapter)
    except ForgeError as exc:  # a sealed adapter that does not decrypt or belongs to another run
        raise ExportError(str(exc)) from None
    except (RuntimeError, ValueError) as exc:  # PEFT: size mismatch / target modules not found
        raise ExportError(f"adapter {src.adapter} does not fit base model {src.model}: {exc}".splitlines()[0]) from None
    return model.eval(), tok
