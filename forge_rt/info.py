"""`python -m forge_rt.info`: version, live backends and why any is off, CPU features."""
from __future__ import annotations

import platform

import torch

import forge_rt
from forge_rt import backend
from forge_rt._native import native


def cpu_features() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "asimd", "sve") if f in have]
    except OSError:
        pass
    return []


def report() -> str:
    mod = native()
    build = mod.build_info() if mod is not None else {}
    lines = [f"forge_rt {forge_rt.__version__}  (torch {torch.__version__}, python {platform.python_version()})",
             f"cpu: {platform.machine()}, features: {' '.join(cpu_features()) or 'none detected'}, "
             f"kernel SIMD: {build.get('simd', 'n/a')}, OpenMP threads: {build.get('openmp_threads', 'n/a')}",
             "backends:"]
    for name, (live, why) in backend.status().items():
        lines.append(f"  {name:<10} {'on ' if live else 'off'}  {why}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
