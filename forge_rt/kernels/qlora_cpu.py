"""C++ (OpenMP) kernels of the fused 4-bit LoRA linear. Inputs of any float dtype are converted to
fp32 (the compute dtype on CPUs: bf16 matmul is far slower there); outputs come back in the input's
dtype. The 4-bit weight is dequantized tile by tile inside the kernel, never as a whole."""
from __future__ import annotations

import torch

from forge_rt.core.native import require_native


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.device.type != "cpu":
        raise ValueError(f"qlora cpu kernels need CPU tensors, got one on {t.device}; "
                         "move it with .cpu() or pick another backend with FORGE_RT_BACKEND")
    return t.to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _weight_args(w) -> tuple[tuple, list[torch.Tensor]]:
    """Pointer arguments describing `w`, and the tensors that must stay alive during the call."""
    rows, cols = int(w.shape[0]), int(w.shape[1])  # sizes were validated by NF4Weight itself
    if w.packed.device.type != "cpu":
        raise ValueError(f"NF4 weight: packed must be on the CPU for the cpu kernels, got {w.packed.device}")
    packed, absmax, code = w.packed.contiguous(), _f32(w.absmax_fp32()), _f32(w.code())
    args = (packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), rows, cols, int(w.blocksize))
    return args, [packed, absmax, code]


def forward(x, w, xa, B, scaling: float, bias):
    x32, xa32, B32, bias32 = _f32(x), _f32(xa), _f32(B), _f32(bias)
    wargs, _alive = _weight_args(w)
    M, r = x32.shape[0], (0 if B32 is None else B32.shape[1])
    y = torch.empty(M, int(w.shape[0]), dtype=torch.float32)
    require_native().qlora_forward(x32.data_ptr(), M, *wargs, _ptr(xa32), _ptr(B32), r, float(scaling),
                                   _ptr(bias32), y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)


def backward_input(g, w, gb, A, scaling: float):
    g32, gb32, A32 = _f32(g), _f32(gb), _f32(A)
    wargs, _alive = _weight_args(w)
    M, r = g32.shape[0], (0 if A32 is None else A32.shape[0])
    gx = torch.empty(M, int(w.shape[1]), dtype=torch.float32)
    require_native().qlora_backward_input(g32.data_ptr(), M, *wargs, _ptr(gb32), _ptr(A32), r,
                                          float(scaling), gx.data_ptr(), torch.get_num_threads())
    return gx.to(g.dtype)


def last_transient_bytes() -> int:
    """Scratch bytes (all threads) the last kernel call allocated."""
    return int(require_native().qlora_last_transient_bytes())


def dropout(x, p: float, seed: int):
    """LoRA dropout with the counter-hash mask of kernels/dropout_reference.py, in one pass (fp32)."""
    from forge_rt.kernels import dropout_reference as ref
    x32 = _f32(x)
    out = torch.empty_like(x32)
    k0, k1 = ref.keys(seed)
    require_native().qlora_dropout(x32.data_ptr(), x32.numel(), k0, k1, ref.threshold(p), ref.scale(p),
                                   out.data_ptr(), torch.get_num_threads())
    return out.to(x.dtype)
