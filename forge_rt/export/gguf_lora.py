"""`--to gguf-lora`: the adapter as a llama.cpp LoRA GGUF, loaded at run time over the unchanged base GGUF.

llama.cpp's conventions (convert_lora_to_gguf.py, src/llama-adapter.cpp): general.type = adapter,
adapter.type = lora, adapter.lora.alpha; per adapted base tensor `<name>.lora_a` (ne = [in, r], i.e.
PEFT's A as is) and `<name>.lora_b` (ne = [r, out], PEFT's B as is); llama.cpp scales by alpha / r with
r read from lora_b. q/k rows of permuted architectures are permuted in B like in the base weight."""
from __future__ import annotations

from pathlib import Path

import gguf

from forge_rt.models.gguf_reader import GGUFReader

from .gguf_common import (PERMUTED_ARCHS, QUANTS, check_hf_arch, encode, gguf_name, name_map, stored_type,
                          to_llamacpp_rows)
from .gguf_stream import Planned, write_streamed
from .source import ExportError

LORA_QUANTS = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's own converter writes for adapters


def check_lora_quant(quant: str) -> None:
    if quant not in LORA_QUANTS:
        raise ExportError(f"--quant {quant} is not an adapter type; --to gguf-lora takes one of {', '.join(LORA_QUANTS)}")


def write_gguf_lora(peft_model, out: Path, quant: str, source_gguf: Path | None) -> int:
    """Writes file `out` (the caller makes it atomic); returns the number of adapted layers."""
    from peft.tuners.lora import LoraLayer

    qtype = QUANTS[quant][0]
    config = peft_model.get_base_model().config
    base_names = None
    if source_gguf is not None:
        reader = GGUFReader(source_gguf)
        arch = reader.fields["general.architecture"].contents()
        base_names = {t.name for t in reader.tensors}
    else:
        arch = check_hf_arch(config.model_type)
    adapter = peft_model.active_adapter
    alpha = float(peft_model.peft_config[adapter].lora_alpha)
    tmap = name_map(arch, config)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    plan = []
    for hf_name, layer in peft_model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter, False) or layer.lora_B[adapter].bias is not None:
            raise ExportError(f"{hf_name}: DoRA / LoRA bias adapters have no llama.cpp form")
        name = gguf_name(tmap, hf_name + ".weight")
        if name is None or (base_names is not None and name not in base_names):
            raise ExportError(f"{hf_name}: no tensor of the base GGUF matches this LoRA layer")
        a = layer.lora_A[adapter].weight.detach().float()
        b = layer.lora_B[adapter].weight.detach().float()
        # llama.cpp applies alpha / r; fold any other scaling (rsLoRA, rank/alpha patterns) into B.
        b = b * (layer.scaling[adapter] * a.shape[0] / alpha)
        if arch in PERMUTED_ARCHS:
            b = to_llamacpp_rows(b, name, config)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            plan.append(Planned(name + suffix, tuple(t.shape), stored_type(tuple(t.shape), qtype),
                                lambda t=t: encode(t, qtype)[0]))
    if not plan:
        raise ExportError("the adapter has no LoRA layers to export")
    write_streamed(writer, plan)
    return len(plan) // 2
