"""forge_rt: offline QLoRA with fused NF4 LoRA kernels and LZ4-compressed activation paging.

Layers (see ARCHITECTURE.md): the format and the op (`nf4`, `ops`, `backend`, `kernels`), modules and
patching (`nn`), the activation pager (`pager`), the memory monitor (`monitor`), the sovereign tools
(`sovereign`), the trainer (`train`) and the command lines on top."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Submodules and functions are imported on first use so `import forge_rt` stays light.
_SUBMODULES = ("core", "nf4", "ops", "kernels", "nn", "pager", "monitor", "sovereign", "plan", "train", "export",
               "generate")
_FUNCTIONS = {
    "quantize_model": "forge_rt.nn.nf4_linear",
    "accelerate": "forge_rt.nn.peft",
    "paging": "forge_rt.pager",
    "merge": "forge_rt.export.merge",
    "ForgeError": "forge_rt.core.errors",
}

if TYPE_CHECKING:  # editors and type checkers see the lazy names
    from forge_rt import core, export, generate, kernels, monitor, nf4, nn, ops, pager, plan, sovereign, train
    from forge_rt.core.errors import ForgeError
    from forge_rt.export.merge import merge
    from forge_rt.nn.nf4_linear import quantize_model
    from forge_rt.nn.peft import accelerate
    from forge_rt.pager import paging


def __getattr__(name: str):
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"forge_rt.{name}")
    raise AttributeError(f"module 'forge_rt' has no attribute {name!r}")


__all__ = ["__version__", *_FUNCTIONS, *_SUBMODULES]
