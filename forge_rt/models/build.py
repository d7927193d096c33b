"""Build the adapted model: base -> (NF4 quantization) -> PEFT LoRA (new, from a directory, or from a
sealed adapter) -> (fused kernels). The one builder the trainer, generate and export share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from forge_rt.core.errors import ForgeError


class TargetError(ForgeError, ValueError):
    """LoRA target modules that the model does not have."""


@dataclass(frozen=True)
class LoraSpec:
    """What build_model needs of a run's configuration (TrainConfig.lora_spec(), RunDir.lora_spec())."""
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"
    fused: bool = True


def target_module_names(model: torch.nn.Module, spec: str) -> list[str]:
    """Leaf names of the LoRA targets. 'all-linear' is resolved here, on the plain model, so it also
    holds after quantization swaps nn.Linear for NF4Linear (and so the adapter config lists names)."""
    if spec != "all-linear":
        names = [s.strip() for s in spec.split(",") if s.strip()]
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise TargetError(f"target_modules {missing} are not modules of this model; e.g. {sorted(present)[:12]}")
        return names
    out = set()
    output_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not output_emb:
            out.add(name.rsplit(".", 1)[-1])
    return sorted(out)


def build_model(base: torch.nn.Module, spec: LoraSpec, adapter_dir: Path | None = None, sealed: Path | None = None,
                passphrase: str | None = None, binding: str | None = None):
    """Base -> (NF4 quantization) -> PEFT LoRA (new, from adapter_dir, or from a sealed adapter decrypted
    in memory and checked against `binding`, the run it must belong to) -> (fused kernels, `spec.fused`)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    targets = target_module_names(base, spec.target_modules)
    if spec.fused:
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
        lcfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=targets, task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(base, lcfg)
    if spec.fused:
        from forge_rt.nn import accelerate
        accelerate(model)
    return model
