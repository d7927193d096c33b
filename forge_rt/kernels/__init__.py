"""Backends of the fused 4-bit LoRA linear. Each module `qlora_<backend>` exposes the same two kernels
(x, g are 2-D and contiguous; `w` is a `forge_rt.nf4.NF4Weight`):

    forward(x[M,K], w, xa[M,r] | None, B[N,r] | None, scaling, bias[N] | None) -> y[M,N]
        y = x @ dequant(w).T + bias + scaling * xa @ B.T
    backward_input(g[M,N], w, gb[M,r] | None, A[r,K] | None, scaling) -> gx[M,K]
        gx = g @ dequant(w) + scaling * gb @ A
    dropout(x, p, seed) -> x with LoRA dropout applied: the counter-hash mask of dropout_reference,
        identical on every backend for the same (seed, shape)

Modules are imported on first use, so a missing Triton only matters to the triton backend."""
from __future__ import annotations

import importlib
from types import ModuleType

QLORA_BACKENDS = ("reference", "cpu", "triton")


def qlora_kernels(backend: str) -> ModuleType:
    """The kernel module of `backend` (one of QLORA_BACKENDS)."""
    if backend not in QLORA_BACKENDS:
        raise ValueError(f"no qlora_linear kernels for backend {backend!r} "
                         f"(available: {', '.join(QLORA_BACKENDS)})")
    return importlib.import_module(f"forge_rt.kernels.qlora_{backend}")
