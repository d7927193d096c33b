"""forge_rt: offline QLoRA with fused NF4 LoRA kernels and LZ4-compressed activation paging."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Submodules and functions are imported on first use so `import forge_rt` stays light.
_SUBMODULES = ("nf4", "ops", "pager", "monitor", "scrub", "seal", "sovereign", "shred", "data", "evaluate",
               "train", "generate", "backend", "model_load")
_FUNCTIONS = {
    "quantize_model": "forge_rt.swap",
    "accelerate": "forge_rt.swap",
    "paging": "forge_rt.pager",
}


def __getattr__(name: str):
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"forge_rt.{name}")
    raise AttributeError(f"module 'forge_rt' has no attribute {name!r}")


__all__ = ["__version__", "quantize_model", "accelerate", "paging", *_SUBMODULES]
