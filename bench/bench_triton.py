"""Accuracy of the Triton fused NF4 LoRA kernels in Triton's CPU interpreter, vs the PyTorch reference.

    python bench/bench_triton.py [--json bench/results/triton_accuracy.json]

Max relative error (max |out - ref| / max |ref|) per dtype and kernel over a grid of odd shapes,
ranks, blocksizes, double quantization and bias. The reference computes in fp32 from the same inputs,
so fp16 errors include rounding W and the output to fp16. Speed is not measured: the interpreter says nothing
about GPU speed. bf16 is left out: the interpreter's bf16 tl.dot is wrong (design.md)."""
from __future__ import annotations

import argparse
import itertools
import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch  # noqa: E402

from forge_rt import nf4  # noqa: E402
from forge_rt.kernels import qlora_reference, qlora_triton  # noqa: E402

SHAPES = [(1, 17, 70), (5, 70, 130), (33, 130, 17), (20, 33, 200), (64, 256, 320)]
RANKS = [None, 1, 8, 33, 256]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def measure() -> dict:
    g = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}
    cases = 0
    for (m, n, k), r, bs, dq, dtype in itertools.product(SHAPES, RANKS, (64, 128), (False, True),
                                                         (torch.float32, torch.float16)):
        w = nf4.quantize(torch.randn(n, k, generator=g), bs, dq)
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
        x, gy, bias = rnd(m, k), rnd(m, n), rnd(n)
        xa, B, gb, A = (rnd(m, r), rnd(n, r), rnd(m, r), rnd(r, k)) if r else (None,) * 4
        name = str(dtype).removeprefix("torch.")
        for kernel, args in (("forward", (x, w, xa, B, 0.5, bias)), ("backward_input", (gy, w, gb, A, 0.5))):
            err = rel_err(getattr(qlora_triton, kernel)(*args), getattr(qlora_reference, kernel)(*args))
            key = f"{kernel}/{name}"
            worst[key] = max(worst.get(key, 0.0), err)
        cases += 1
    return {"cases": cases, "max_rel_err": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    res = measure()
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
