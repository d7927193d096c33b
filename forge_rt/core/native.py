"""Loads forge_rt._C once, preloading nvCOMP's CPU library from its wheel so the extension resolves
it wherever the wheel sits. `native()` returns the module or None; `native_error()` says why not."""
from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache


def _preload_nvcomp() -> None:
    spec = importlib.util.find_spec("nvidia.libnvcomp")
    if spec is None or not spec.submodule_search_locations:
        return
    lib = os.path.join(list(spec.submodule_search_locations)[0], "lib64", "libnvcomp_cpu.so.6")
    if os.path.exists(lib):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


@lru_cache(maxsize=None)
def _load():
    try:
        _preload_nvcomp()
        from forge_rt import _C
        return _C, None
    except (ImportError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def native():
    return _load()[0]


def native_error() -> str | None:
    return _load()[1]


def require_native():
    mod, err = _load()
    if mod is None:
        raise RuntimeError(
            f"forge_rt._C is not available ({err}). Reinstall forge_rt with `pip install .` so the "
            "C++ extension is built, or set FORGE_RT_BACKEND=reference.")
    return mod
