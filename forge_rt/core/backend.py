"""Chooses the implementation of an op: `reference` (PyTorch oracle), `cpu` (C++), `triton` or `cuda`.

By the tensor's device, overridable with FORGE_RT_BACKEND. A GPU without Triton (common on Jetson)
falls back to CUDA C++ and then the reference, and says so once."""
from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache

import torch

from forge_rt.core.native import native, native_error

BACKENDS = ("reference", "cpu", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every backend's kernels take
log = logging.getLogger("forge_rt")
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


@lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device for Triton (set TRITON_INTERPRET=1 to run kernels on the CPU)"
    return True, "Triton on " + torch.cuda.get_device_name()


@lru_cache(maxsize=None)
def status() -> dict[str, tuple[bool, str]]:
    """Each backend: (live, why). Fixed for the process: it is asked on every op call."""
    mod = native()
    info = mod.build_info() if mod is not None else {}
    cpu = (mod is not None, "C++ extension loaded" if mod is not None else f"no extension: {native_error()}")
    if not info.get("cuda"):
        cuda = (False, "extension built without a CUDA toolkit" if mod is not None else cpu[1])
    elif not torch.cuda.is_available():
        cuda = (False, "built with CUDA, but torch sees no CUDA device")
    else:
        cuda = (True, "CUDA kernels on " + torch.cuda.get_device_name())
    nvcomp = (bool(info.get("nvcomp")), "nvCOMP CPU LZ4 linked" if info.get("nvcomp")
              else "extension built without nvCOMP" if mod is not None else cpu[1])
    return {"reference": (True, "pure PyTorch"), "cpu": cpu, "triton": triton_status(),
            "cuda": cuda, "nvcomp": nvcomp}


def select(tensor: torch.Tensor, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend to run an op on `tensor`; FORGE_RT_BACKEND forces one (error if it can't run)."""
    forced = os.environ.get("FORGE_RT_BACKEND")
    st = status()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FORGE_RT_BACKEND={forced!r}: choose one of {', '.join(BACKENDS)}")
        if forced not in supported:
            raise ValueError(f"FORGE_RT_BACKEND={forced!r} is not implemented for this op "
                             f"(supported: {', '.join(supported)})")
        if not st[forced][0]:
            raise RuntimeError(f"FORGE_RT_BACKEND={forced!r} is not live: {st[forced][1]}")
        needs = {"cpu": "cpu", "cuda": "cuda"}.get(forced)  # triton also runs CPU tensors when interpreting
        if needs and tensor.device.type != needs:
            raise ValueError(f"FORGE_RT_BACKEND={forced!r} cannot run on a {tensor.device.type} tensor; "
                             f"move it to {needs} or force another backend")
        return forced
    if tensor.device.type == "cuda":
        for name in ("triton", "cuda"):
            if name in supported and st[name][0]:
                return name
            _warn_once(f"forge_rt: {name} backend off ({st[name][1]}); falling back")
        return "reference"
    if "cpu" in supported and st["cpu"][0]:
        return "cpu"
    _warn_once(f"forge_rt: cpu backend off ({st['cpu'][1]}); using the PyTorch reference")
    return "reference"


def cpu_features() -> list[str]:
    """The SIMD features this CPU reports (/proc/cpuinfo) that forge_rt's native paths can use."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ("sse4_2", "avx2", "fma", "f16c", "avx512f", "avx512bw", "asimd", "crc32", "sve") if f in have]
    except OSError:
        pass
    return []
