"""The machine a suite ran on, so that two records can be compared knowingly: CPU, memory, GPU, library
versions, Jetson model and power mode, and the load average (a shared box skews every timing)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import torch

from forge_rt.core.backend import cpu_features


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def _run(*cmd: str, timeout: float = 10.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu() -> dict:
    info = _read("/proc/cpuinfo") or ""
    model = re.search(r"^(model name|Hardware|CPU part)\s*:\s*(.+)$", info, re.M)
    from forge_rt.core.native import native
    mod = native()
    return {"model": model.group(2) if model else platform.processor() or platform.machine(),
            "arch": platform.machine(), "flags": cpu_features(),
            "logical_cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "kernel_path": mod.cpu_features()["simd"] if mod is not None else None}


def memory() -> dict:
    meminfo = _read("/proc/meminfo") or ""
    total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    return {"total_gib": round(int(total.group(1)) / 2**20, 2) if total else None}


def gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    smi = _run("nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
               "--format=csv,noheader,nounits")
    driver, sm_clock, mem_clock, power = (smi.splitlines()[0].split(", ") + [None] * 4)[:4] if smi else [None] * 4
    return {"name": p.name, "sm": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 2), "cuda": torch.version.cuda, "driver": driver,
            "max_sm_clock_mhz": sm_clock, "max_mem_clock_mhz": mem_clock, "power_limit_w": power}


def jetson() -> dict | None:
    release = _read("/etc/nv_tegra_release")
    model = _read("/proc/device-tree/model")
    if release is None and (model is None or "jetson" not in model.lower()):
        return None
    mode = _run("nvpmodel", "-q")
    tegra = _run("timeout", "2", "tegrastats", "--interval", "500", timeout=5)
    return {"model": model.rstrip("\x00") if model else None, "l4t": release.splitlines()[0] if release else None,
            "power_mode": " ".join(mode.split()) if mode else None,
            "tegrastats": tegra.splitlines()[0] if tegra else None}


def versions() -> dict:
    import forge_rt
    return {"python": platform.python_version(), "forge_rt": forge_rt.__version__, "torch": torch.__version__,
            **{d: _version(d) for d in ("triton", "bitsandbytes", "transformers", "peft", "xllamacpp",
                                        "nvidia-libnvcomp-cu12", "nvidia-libnvcomp-cu13", "pytest-benchmark")}}


def environment() -> dict:
    """Everything but the load average, which the runner takes before and after the cases."""
    return {"host": platform.node(), "os": platform.platform(), "cpu": cpu(), "memory": memory(), "gpu": gpu(),
            "jetson": jetson(), "versions": versions()}


def device_auto() -> str:
    """jetson (CUDA on a Tegra board), cuda, or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    return "jetson" if jetson() is not None else "cuda"


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]
