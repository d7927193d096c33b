"""Triton backend of the fused NF4 LoRA linear, run in Triton's CPU interpreter.

Weights are bitsandbytes' own bytes (quantize_4bit) viewed as an NF4Weight; the oracle is
bitsandbytes' dequantize_4bit, then plain PyTorch matmuls in fp32. fp16 kernels are compared with that
oracle on the same fp16 inputs, so the only allowed error is fp32 summation order plus the final fp16
rounding. End to end, qlora_linear on the triton backend is compared with the reference backend (all
grads). bf16 products can't be checked here (the interpreter's bf16 tl.dot is wrong, see design.md):
the bf16 kernels are only compiled for a GPU target."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' import: Triton picks the mode at decoration

import dataclasses
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch

from forge_rt.kernels import nf4_triton, qlora_triton
from forge_rt.nf4 import NF4Weight

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def make_weight(n, k, blocksize, double_quant, quant_type="nf4", seed=0):
    """(NF4Weight holding bitsandbytes' own bytes, fp32 weight dequantized by bitsandbytes)."""
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    packed, st = bnbf.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    return NF4Weight.from_bnb(packed, st), bnbf.dequantize_4bit(packed, st)


def rel_err(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# (M, N, K, blocksize, double_quant): no side a multiple of the tiles, K not a multiple of the blocksize
SHAPES = [(1, 17, 70, 64, True), (5, 70, 130, 64, False), (33, 130, 17, 128, True),
          (5, 130, 70, 128, False), (20, 90, 200, 64, True),  # 282 blocks: more than one nested absmax
          (3, 150, 128, 64, True), (17, 33, 256, 128, False)]  # K % blocksize == 0: one scale per row and tile
RANKS = [None, 1, 8, 33]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}N{}K{}bs{}{}".format(*s[:4], "dq" if s[4] else ""))
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_forward_matches_oracle(dtype, shape, rank, with_bias):
    m, n, k, bs, dq = shape
    w, W = make_weight(n, k, bs, dq)
    x = torch.randn(m, k).to(dtype)
    xa = torch.randn(m, rank).to(dtype) if rank else None
    B = torch.randn(n, rank).to(dtype) if rank else None
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = qlora_triton.forward(x, w, xa, B, 0.75, bias)
    ref = x.float() @ W.to(dtype).float().T
    if with_bias:
        ref += bias.float()
    if rank:
        ref += 0.75 * xa.float() @ B.float().T
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}N{}K{}bs{}{}".format(*s[:4], "dq" if s[4] else ""))
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
def test_backward_input_matches_oracle(dtype, shape, rank):
    m, n, k, bs, dq = shape
    w, W = make_weight(n, k, bs, dq)
    g = torch.randn(m, n).to(dtype)
    gb = torch.randn(m, rank).to(dtype) if rank else None
    A = torch.randn(rank, k).to(dtype) if rank else None
    gx = qlora_triton.backward_input(g, w, gb, A, 0.75)
    ref = g.float() @ W.to(dtype).float()
    if rank:
        ref += 0.75 * gb.float() @ A.float()
    assert gx.dtype == dtype and gx.shape == (m, k)
    assert rel_err(gx, ref) <= TOL[dtype]


@pytest.mark.parametrize("rank", [64, 65, 256])
def test_large_ranks_span_several_rank_chunks(rank):
    w, W = make_weight(40, 50, 64, False)
    x, xa, B = torch.randn(3, 50), torch.randn(3, rank), torch.randn(40, rank)
    assert rel_err(qlora_triton.forward(x, w, xa, B, 0.1, None), x @ W.T + 0.1 * xa @ B.T) <= 1e-5
    g, gb, A = torch.randn(3, 40), torch.randn(3, rank), torch.randn(rank, 50)
    assert rel_err(qlora_triton.backward_input(g, w, gb, A, 0.1), g @ W + 0.1 * gb @ A) <= 1e-5


def test_int64_index_path(monkeypatch):
    """Weights past 2**31 elements index in int64; too big for the interpreter, so force that path."""
    monkeypatch.setattr(qlora_triton, "_wide", lambda n, k: True)
    w, W = make_weight(33, 128, 64, True)
    x, g = torch.randn(5, 128), torch.randn(5, 33)
    assert rel_err(qlora_triton.forward(x, w, None, None, 1.0, None), x @ W.T) <= 1e-5
    assert rel_err(qlora_triton.backward_input(g, w, None, None, 1.0), g @ W) <= 1e-5


def test_kernels_compile_for_a_gpu_without_one():
    """bf16 can't be checked in the interpreter and compiled Triton is stricter than it: build the kernels
    for sm_87 (Jetson Orin) with Triton's bundled ptxas, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_aot_compile.py")), "--arch", "87",
                          "--dtype", "bf16", "--m", "1024"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sm_87 bf16 M=1024" in out.stdout and "forward REG:" in out.stdout


def test_lora_term_runs_in_the_adapter_dtype():
    """ops/qlora.py hands fp32 xa / gb from fp32 adapters under an fp16 base: no fp16 rounding of that term."""
    w, W = make_weight(40, 50, 64, True)
    x, xa, B = torch.randn(3, 50).half(), torch.randn(3, 8), torch.randn(40, 8)
    ref = x.float() @ W.half().float().T + 0.5 * xa @ B.T
    assert rel_err(qlora_triton.forward(x, w, xa, B, 0.5, None), ref) <= 1e-3
    g, gb, A = torch.randn(3, 40).half(), torch.randn(3, 8), torch.randn(8, 50)
    ref = g.float() @ W.half().float() + 0.5 * gb @ A
    assert rel_err(qlora_triton.backward_input(g, w, gb, A, 0.5), ref) <= 1e-3


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,double_quant", [(64, False), (64, True), (128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dequantize_equals_bitsandbytes(quant_type, blocksize, double_quant, dtype):
    w, W = make_weight(33, 751, blocksize, double_quant, quant_type)  # odd count: last byte half used; >256 blocks
    out = nf4_triton.dequantize(w, dtype)
    assert out.dtype == dtype and out.shape == (33, 751)
    if dtype == torch.bfloat16:
        # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even): allow one bf16 ulp
        assert ((out.float() - W).abs() <= W.abs() * 2.0**-7).all()
    else:
        assert torch.equal(out, W.to(dtype))


def test_dequantize_any_shape_matches_forge_nf4():
    from forge_rt import nf4
    w = nf4.quantize(torch.randn(3, 5, 77), blocksize=64, double_quant=True)
    assert torch.equal(nf4_triton.dequantize(w), nf4.dequantize(w))


def test_strided_inputs_and_empty_batch():
    w, W = make_weight(20, 70, 64, True)
    x, bias = torch.randn(4, 140)[:, ::2], torch.randn(40)[::2]  # non-contiguous views
    assert rel_err(qlora_triton.forward(x, w, None, None, 1.0, bias), x @ W.T + bias) <= 1e-5
    assert qlora_triton.forward(torch.empty(0, 70), w, None, None, 1.0, None).shape == (0, 20)
    assert qlora_triton.backward_input(torch.empty(0, 20), w, None, None, 1.0).shape == (0, 70)


def test_bad_inputs_get_clear_errors():
    w, _ = make_weight(20, 70, 64, False)
    x = torch.randn(3, 70)
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, 70\]"):
        qlora_triton.forward(torch.randn(3, 71), w, None, None, 1.0, None)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        qlora_triton.forward(x.to(torch.int32), w, None, None, 1.0, None)
    with pytest.raises(ValueError, match="both xa and B"):
        qlora_triton.forward(x, w, torch.randn(3, 4), None, 1.0, None)
    with pytest.raises(ValueError, match="LoRA shapes don't fit"):
        qlora_triton.forward(x, w, torch.randn(3, 4), torch.randn(20, 5), 1.0, None)
    with pytest.raises(ValueError, match=r"A \[r, 70\]"):
        qlora_triton.backward_input(torch.randn(3, 20), w, torch.randn(3, 4), torch.randn(70, 4), 1.0)
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        qlora_triton.forward(x, w, None, None, 1.0, torch.randn(21))
    # Malformed weights are refused by NF4Weight itself, before any kernel can see them.
    with pytest.raises(ValueError, match="needs 700"):
        dataclasses.replace(w, packed=w.packed[:-1])
    with pytest.raises(ValueError, match="absmax has 21 entries"):
        dataclasses.replace(w, absmax=w.absmax[:-1])
    with pytest.raises(ValueError, match="must be float32"):
        dataclasses.replace(w, absmax=w.absmax.to(torch.uint8))


def _run_op(x, w, A, B, bias, dropout, gy):
    """Output and the grads of x, A, B, bias of one qlora_linear call on the current backend."""
    from forge_rt import ops
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, A, B, bias)]
    torch.manual_seed(1)  # same dropout mask on both backends
    y = ops.qlora_linear(leaves[0], w, leaves[1], leaves[2], 0.5, leaves[3], dropout)
    y.backward(gy)
    return [y] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("quant_type,blocksize,double_quant,with_bias,dropout",
                         [("nf4", 64, True, True, 0.0), ("nf4", 128, False, False, 0.0),
                          ("fp4", 64, False, True, 0.1)])
def test_qlora_linear_on_triton_matches_reference_backend(monkeypatch, dtype, quant_type, blocksize,
                                                          double_quant, with_bias, dropout):
    from forge_rt import nf4
    from forge_rt.core import backend
    n, k, r = 70, 130, 8
    w = nf4.quantize(torch.randn(n, k, dtype=dtype), blocksize, double_quant, quant_type)
    x = torch.randn(2, 3, k).to(dtype)
    A, B = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1  # fp32 adapters, as PEFT keeps them
    bias = torch.randn(n).to(dtype) if with_bias else None
    gy = torch.randn(2, 3, n).to(dtype)
    backend.triton_status.cache_clear()  # TRITON_INTERPRET was set above, maybe after a first probe
    backend.status.cache_clear()  # status() caches triton_status()'s answer too
    results = {}
    for name in ("triton", "reference"):
        monkeypatch.setenv("FORGE_RT_BACKEND", name)
        results[name] = _run_op(x, w, A, B, bias, dropout, gy)
    for got, ref in zip(results["triton"], results["reference"]):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert rel_err(got, ref.float()) <= (2e-3 if dtype == torch.float16 else 1e-5)
