"""forge_rt: offline QLoRA with fused NF4 LoRA kernels and LZ4-compressed activation paging.

Layers, bottom up (ARCHITECTURE.md): `core` (errors, native loader, backend dispatch, atomic writes), `nf4`
(the format), `kernels` and `ops` (the fused ops), `nn` (modules and PEFT patching), `pager` (activation
paging), `monitor`, `sovereign`, `data`, `models`, `privacy`, `plan`, `eval`, `train`, `export`, and the
command lines in `cli`."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Submodules and functions are imported on first use so `import forge_rt` stays light.
_SUBMODULES = ("core", "nf4", "ops", "kernels", "nn", "pager", "monitor", "sovereign", "data", "models", "privacy",
               "plan", "eval", "train", "export", "cli")
_FUNCTIONS = {
    "quantize_model": "forge_rt.nn.nf4_linear",
    "accelerate": "forge_rt.nn.peft",
    "paging": "forge_rt.pager",
    "merge": "forge_rt.export.merge",
    "ForgeError": "forge_rt.core.errors",
}

if TYPE_CHECKING:  # editors and type checkers see the lazy names
    from forge_rt import (cli, core, data, eval, export, kernels, models, monitor, nf4, nn, ops, pager, plan,  # noqa: F401
                          privacy, sovereign, train)
    from forge_rt.core.errors import ForgeError  # noqa: F401
    from forge_rt.export.merge import merge  # noqa: F401
    from forge_rt.nn.nf4_linear import quantize_model  # noqa: F401
    from forge_rt.nn.peft import accelerate  # noqa: F401
    from forge_rt.pager import paging  # noqa: F401


def __getattr__(name: str):
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"forge_rt.{name}")
    raise AttributeError(f"module 'forge_rt' has no attribute {name!r}")


__all__ = ["__version__", *_FUNCTIONS, *_SUBMODULES]
