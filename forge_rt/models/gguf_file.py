"""What a GGUF file needs beyond transformers' GGUF loader: every tensor checked to be of a type the `gguf`
package can dequantize, and no vision projector where a language model is expected, before any long work;
and Llama 3.x rope scaling. llama.cpp's converter stores it as one divisor per rotary frequency
(the rope_freqs tensor) and no scaling keys; transformers' GGUF loader drops that tensor, so the model would
rotate with plain rope and differ from the file in llama.cpp. The divisors are applied to the model's
inverse frequencies here: the rotation llama.cpp computes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from forge_rt.models.paths import ModelLoadError

ROPE_FREQS = "rope_freqs.weight"


def dequantizable(qtype) -> bool:
    """Whether the `gguf` package can turn tensors of GGML type `qtype` into floats."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import _type_traits  # the registry `gguf.dequantize` itself dispatches on
    return qtype in (Q.F32, Q.F16) or qtype in _type_traits


def check_gguf(path: Path) -> None:
    """Refuses, before anything is loaded, a GGUF that is a vision projector or holds a tensor whose type
    cannot be dequantized (naming the first such tensor and its type)."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"could not load model from {path}: the GGUF is truncated or corrupt "
                             f"({type(exc).__name__}: {exc}); copy it again") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch == "clip":
        raise ModelLoadError(f"{path} is a multimodal projector (mmproj, architecture 'clip'), not a language "
                             "model; pass the text model's .gguf (forge_rt trains text-only decoders)")
    bad = [t for t in reader.tensors if not dequantizable(t.tensor_type)]
    if bad:
        t = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ModelLoadError(f"{path}: tensor {t.name} is of GGML type {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantize{more}; convert the file to a type it reads (e.g. Q8_0, Q4_K or "
                             "F16 with llama.cpp's llama-quantize) or pass the HF directory")


def gguf_rope_freqs(path: Path) -> torch.Tensor | None:
    """The file's rope_freqs divisors (fp32), or None when it has none."""
    from gguf import GGUFReader, dequantize
    for t in GGUFReader(path).tensors:
        if t.name == ROPE_FREQS:
            return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1))
    return None


def apply_rope_freqs(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Divides the rotary embedding's inverse frequencies by the GGUF's rope_freqs, in place; a model
    whose config already carries a rope scaling is left as transformers built it."""
    factors = gguf_rope_freqs(path)
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    if factors is None or rope.get("rope_type", "default") != "default":
        return model
    rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotary or any(m.inv_freq.shape != factors.shape for m in rotary):
        raise ModelLoadError(f"{path}: its rope_freqs ({factors.numel()} values) do not fit the model's rotary "
                             "embedding; the file's rope scaling cannot be reproduced")
    for m in rotary:
        m.inv_freq = m.inv_freq / factors.to(m.inv_freq)
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
            m.original_inv_freq = m.inv_freq.clone()
    return model
