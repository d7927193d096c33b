"""Compiles the Triton kernels for NVIDIA GPUs on a machine without one (Triton ships its own ptxas) and
prints each build's registers, spill stack and shared memory. It catches what the CPU interpreter lets
through (e.g. mismatched types across constexpr branches) and shows register pressure; it says
nothing about speed.

    python tests/kernels/triton_aot_compile.py [--arch 80 87 90] [--dtype fp16 bf16 fp32] [--m 1 1024]

Run in its own process: the kernels must be decorated with TRITON_INTERPRET unset."""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from forge_rt.kernels import nf4_triton, qlora_triton  # noqa: E402

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SCALE_TYPES = {"packed_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
               "offset": "fp32"}


def _compile(kernel, types: dict, constexprs: dict, target: GPUTarget, num_warps: int, num_stages: int = 3):
    names = kernel.arg_names
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
    src = ASTSource(kernel, signature, constexprs={(names.index(a),): v for a, v in constexprs.items()})
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _usage(compiled) -> str:
    """'REG:n STACK:n' from cuobjdump (bundled with Triton) plus the kernel's shared memory."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    reg = next(line for line in out.splitlines() if "REG:" in line).split()
    return f"{reg[0]} {reg[1]} SMEM:{compiled.metadata.shared}"


def compile_all(arch: int, dtype: str, m: int, double_quant: bool, rank: int = 16, blocksize: int = 64):
    """Compiles forward, backward_input and dequantize as the wrappers would launch them for a
    (4096, 4096) weight; returns {kernel: usage}."""
    target = GPUTarget("cuda", arch, 32)
    lora = "fp32"  # adapters are usually kept in fp32
    bm, bn, bk, br, warps = qlora_triton._tiles(m, rank, TORCH_DTYPES[dtype])
    scale = {**SCALE_TYPES, "absmax_ptr": "*u8" if double_quant else "*fp32", "scaling": "fp32"}
    common = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=256, ROW_SCALE=True,
                  WIDE_INDEX=False, HAS_LORA=True, PRECISION="ieee" if dtype == "fp32" else "tf32",
                  LORA_PRECISION="ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br)
    fwd = _compile(qlora_triton._forward_kernel,
                   {**scale, "x_ptr": f"*{dtype}", "xa_ptr": f"*{lora}", "b_ptr": f"*{lora}", "bias_ptr": f"*{dtype}",
                    "y_ptr": f"*{dtype}"}, {**common, "HAS_BIAS": True}, target, warps)
    bwd = _compile(qlora_triton._backward_input_kernel,
                   {**scale, "g_ptr": f"*{dtype}", "gb_ptr": f"*{lora}", "a_ptr": f"*{lora}", "gx_ptr": f"*{dtype}"},
                   common, target, warps)
    deq = _compile(nf4_triton._dequantize_kernel, {**scale, "out_ptr": f"*{dtype}", "numel": "i64"},
                   dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=256, BLOCK=1024),
                   target, 4)
    return {"forward": _usage(fwd), "backward_input": _usage(bwd), "dequantize": _usage(deq)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 87, 90])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--double-quant", type=int, nargs="+", default=[1])
    args = ap.parse_args()
    for arch, dtype, m, dq in itertools.product(args.arch, args.dtype, args.m, args.double_quant):
        usage = compile_all(arch, dtype, m, bool(dq))
        print(f"sm_{arch} {dtype} M={m} dq={dq}: " + "; ".join(f"{k} {v}" for k, v in usage.items()), flush=True)


if __name__ == "__main__":
    main()
