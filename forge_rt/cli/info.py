"""`python -m forge_rt.info`: version, live backends and why any is off, CPU features and the native
code paths that run on them."""
from __future__ import annotations

import argparse
import platform

import torch

import forge_rt
from forge_rt.core import backend
from forge_rt.core.backend import cpu_features
from forge_rt.core.native import native


def native_paths(mod) -> str:
    """The extension's CPU paths, chosen at load by the CPU (FORGE_RT_CPU_PATH=generic forces the baseline)."""
    if mod is None:
        return "n/a"
    f = mod.cpu_features()
    forced = "" if f["selected"] == "auto" else f", FORGE_RT_CPU_PATH={f['selected']}"
    return f"{f['simd']} (of {'/'.join(f['available'])}{forced}), CRC-32C: {f['crc32c']}"


def report() -> str:
    mod = native()
    build = mod.build_info() if mod is not None else {}
    lines = [f"forge_rt {forge_rt.__version__}  (torch {torch.__version__}, python {platform.python_version()})",
             f"cpu: {platform.machine()}, features: {' '.join(cpu_features()) or 'none detected'}, "
             f"OpenMP threads: {build.get('openmp_threads', 'n/a')}",
             f"kernel path: {native_paths(mod)}",
             "backends:"]
    for name, (live, why) in backend.status().items():
        lines.append(f"  {name:<10} {'on ' if live else 'off'}  {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m forge_rt.info", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())
    return 0
