"""forge_rt.ops.qlora_linear on the C++ CPU backend vs an independent oracle: the 4-bit bytes decoded
by plain torch indexing (anchored to bitsandbytes' dequantize_4bit below), then float64 autograd."""
import itertools

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from forge_rt import nf4, ops  # noqa: E402
from forge_rt.ops import qlora  # noqa: E402
from forge_rt.kernels import qlora_cpu  # noqa: E402


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FORGE_RT_BACKEND", "cpu")


def plain_dequant(w):
    """Element 2i in the high nibble of byte i, 2i+1 in the low one; value code[nibble] * absmax[block]."""
    nibbles = torch.stack([w.packed >> 4, w.packed & 15], dim=1).reshape(-1)[: w.shape.numel()].long()
    scale = w.absmax_fp32().repeat_interleave(w.blocksize)[: w.shape.numel()]
    return (w.code()[nibbles] * scale).to(torch.float64).reshape(w.shape)


def make_weight(N, K, seed=0, **quant):
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    w = nf4.quantize(W, **quant)
    return w, plain_dequant(w)


@pytest.mark.parametrize("quant", [dict(double_quant=False), dict(double_quant=True, quant_type="fp4")])
def test_plain_dequant_matches_bitsandbytes(quant):
    # Rows of whole quant blocks: bitsandbytes 0.50's CPU dequantize_4bit mis-decodes rows whose
    # length is a multiple of 32 but not of the blocksize (e.g. 7 x 96), so it can't be the oracle there.
    w, W = make_weight(48, 192, **quant)
    torch.testing.assert_close(W, bnbf.dequantize_4bit(*w.to_bnb()).double().reshape(48, 192), rtol=0, atol=0)


def oracle(x, W, A, B, s, bias, mask=None, p=0.0):
    """Plain float64 autograd of the op; returns output and grads of x, A, B, bias for upstream gy."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, A, B, bias)]
    xd, Ad, Bd, bd = leaves
    y = xd @ W.T
    if bd is not None:
        y = y + bd
    if Ad is not None:
        xl = xd * mask.double() / (1 - p) if mask is not None else xd
        y = y + s * (xl @ Ad.T) @ Bd.T
    return y, [t for t in leaves if t is not None]


def rel(a, b, scale=None):
    """Norm-wise relative error of a vs b; `scale` (the same result computed from absolute values)
    replaces |b| where sums cancel, e.g. a single-element grad summed over 300 mixed-sign terms."""
    ref = b.double().norm() if scale is None else scale.double().norm()
    return ((a.double() - b.double()).norm() / ref.clamp_min(1e-30)).item()


def run_case(M, N, K, r, with_bias, lead=(), dropout=0.0, seed=0):
    w, W = make_weight(N, K, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, M, K, generator=gen).requires_grad_()
    A = (torch.randn(r, K, generator=gen) / K**0.5).requires_grad_() if r else None
    B = torch.randn(N, r, generator=gen).requires_grad_() if r else None
    bias = torch.randn(N, generator=gen).requires_grad_() if with_bias else None
    s = 0.75
    torch.manual_seed(seed + 2)
    y = ops.qlora_linear(x, w, A, B, s, bias=bias, dropout=dropout)
    mask = None
    if dropout and r:
        torch.manual_seed(seed + 2)  # the op draws its dropout seed from the global generator
        mask = ops.dropout_mask(x.shape[:-1] and (x.numel() // K, K), dropout, ops.dropout_seed(), x.device)
        mask = mask.reshape(x.shape)
    y_ref, leaves = oracle(x, W, A, B, s, bias, mask, dropout)
    absent = lambda t: None if t is None else t.abs()  # noqa: E731
    y_abs, leaves_abs = oracle(x.abs(), W.abs(), absent(A), absent(B), s, absent(bias), mask, dropout)
    assert y.shape == (*lead, M, N) and y.dtype == x.dtype
    assert rel(y, y_ref, y_abs) <= 1e-5
    gy = torch.randn(y.shape, generator=gen)
    tensors = [t for t in (x, A, B, bias) if t is not None]
    grads = torch.autograd.grad(y, tensors, gy)
    grads_ref = torch.autograd.grad(y_ref, leaves, gy.double())
    grads_abs = torch.autograd.grad(y_abs, leaves_abs, gy.double().abs())
    for name, g, g_ref, g_abs in zip(("x", "A", "B", "bias"), grads, grads_ref, grads_abs):
        assert g.shape == g_ref.shape and g.dtype == torch.float32, name
        assert rel(g, g_ref, g_abs) <= 1e-5, (name, rel(g, g_ref), rel(g, g_ref, g_abs))


# M: the GEMV paths (1, 3) and the blocked GEMM with partial 6-row tiles (17, 130); N, K off every
# tile (16, 256) and quant block (64): odd K makes rows start mid-byte, blocks straddle rows; K = 96
# and 2048 take the GEMV's 32-element byte-shuffle decoder (rows starting mid-block for 96).
SHAPES = list(itertools.product((1, 3, 17, 130), ((1, 7), (7, 96), (65, 129), (129, 300), (300, 1), (40, 2048))))
RANKS = (1, 4, 16, 256)


@pytest.mark.parametrize("i,case", list(enumerate(SHAPES)))
def test_matches_oracle(i, case):
    M, (N, K) = case
    run_case(M, N, K, r=RANKS[i % len(RANKS)], with_bias=bool(i % 2))


@pytest.mark.parametrize("M,N,K", [(1, 1024, 2080), (3, 700, 1500), (40, 300, 500)])
def test_big_enough_to_split_across_threads(M, N, K):
    # Small problems run on one thread (a fork/join would cost more); these take the threaded paths,
    # which the kernel only uses with torch on 2+ threads.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_case(M, N, K, r=16, with_bias=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("M", [2, 40])
def test_dropout_uses_the_same_mask_in_backward(M):
    run_case(M, 65, 300, r=8, with_bias=True, dropout=0.3)


def test_dropout_drops():
    w, _ = make_weight(8, 512)
    x = torch.ones(4, 512)
    A, B = torch.ones(1, 512), torch.ones(8, 1)
    torch.manual_seed(0)
    lora = ops.qlora_linear(x, w, A, B, 1.0, dropout=0.5) - ops.qlora_linear(x, w, None, None, 1.0)
    kept = lora[:, 0] * 0.5  # sum over K of mask / (1 - p), times (1 - p)
    assert 150 < kept.min() and kept.max() < 362, kept  # ~256 of 512 kept


def test_leading_batch_dims_and_plain_linear():
    run_case(5, 33, 70, r=0, with_bias=True, lead=(2, 3))
    run_case(1, 33, 70, r=3, with_bias=False, lead=(4,))
    w, W = make_weight(9, 33)
    x = torch.randn(33)  # no batch dim at all
    y = ops.qlora_linear(x, w, None, None, 1.0)
    assert y.shape == (9,) and rel(y, W @ x.double()) <= 1e-5


def test_non_contiguous_inputs_are_handled():
    w, _ = make_weight(40, 96)
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(96, 20, generator=gen).T  # [20, 96] non-contiguous
    A_t = torch.randn(96, 4, generator=gen).T
    B = torch.randn(40, 8, generator=gen)[:, ::2]
    y = ops.qlora_linear(x_t, w, A_t, B, 0.5)
    y_ref = ops.qlora_linear(x_t.contiguous(), w, A_t.contiguous(), B.contiguous(), 0.5)
    assert rel(y, y_ref) <= 1e-6  # not bitwise: torch may order the x @ A.T sums differently


@pytest.mark.parametrize("quant", [dict(double_quant=True), dict(double_quant=False, blocksize=128),
                                   dict(double_quant=True, quant_type="fp4")])
def test_weight_formats(quant):
    w, W = make_weight(70, 200, seed=5, **quant)
    x = torch.randn(20, 200)
    assert rel(ops.qlora_linear(x, w, None, None, 1.0), x.double() @ W.T) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    w, W = make_weight(50, 130)
    x = torch.randn(9, 130).to(dtype).requires_grad_()
    A = (torch.randn(4, 130) / 12).to(dtype).requires_grad_()
    B = torch.randn(50, 4).requires_grad_()  # adapters in fp32 over a half base: PEFT's usual mix
    bias = torch.randn(50).requires_grad_()
    y = ops.qlora_linear(x, w, A, B, 2.0, bias)
    y_ref, leaves = oracle(x, W, A.to(torch.float32), B, 2.0, bias)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel(y, y_ref) <= tol
    gy = torch.randn(y.shape).to(dtype)
    grads = torch.autograd.grad(y, (x, A, B, bias), gy)
    assert [g.dtype for g in grads] == [dtype, dtype, torch.float32, torch.float32]
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref, leaves, gy.double())):
        assert rel(g, g_ref) <= tol


def test_reference_backend_agrees(monkeypatch):
    w, _ = make_weight(65, 129)
    x, A, B, b = torch.randn(17, 129), torch.randn(8, 129), torch.randn(65, 8), torch.randn(65)
    y_cpu = ops.qlora_linear(x, w, A, B, 0.5, b)
    monkeypatch.setenv("FORGE_RT_BACKEND", "reference")
    assert rel(ops.qlora_linear(x, w, A, B, 0.5, b), y_cpu) <= 1e-6


def test_empty_batch():
    w, _ = make_weight(9, 33)
    x = torch.zeros(0, 33, requires_grad=True)
    A, B = torch.randn(2, 33, requires_grad=True), torch.randn(9, 2, requires_grad=True)
    y = ops.qlora_linear(x, w, A, B, 1.0)
    assert y.shape == (0, 9)
    gx, gA, gB = torch.autograd.grad(y.sum(), (x, A, B))
    assert gx.shape == (0, 33) and not gA.any() and not gB.any()


@pytest.mark.parametrize("N,K", [(2048, 2048), (576, 576)])  # a big layer and a SmolLM2-sized one
def test_weight_never_materialized(N, K):
    """Scratch buffers stay under 10% of the dequantized fp32 weight (on both kernel paths)."""
    w, _ = make_weight(N, K)
    for M in (1, 64):
        x, g = torch.randn(M, K), torch.randn(M, N)
        A, B = torch.randn(16, K), torch.randn(N, 16)
        qlora_cpu.forward(x, w, x @ A.T, B, 1.0, None)
        assert qlora_cpu.last_transient_bytes() < 0.10 * N * K * 4
        qlora_cpu.backward_input(g, w, g @ B, A, 1.0)
        assert qlora_cpu.last_transient_bytes() < 0.10 * N * K * 4


def test_bad_input_gets_a_clear_error():
    w, _ = make_weight(8, 16)
    x, A, B = torch.randn(3, 16), torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ops.qlora_linear(x.long(), w, A, B, 1.0)
    with pytest.raises(ValueError, match="last dim must be 16"):
        ops.qlora_linear(torch.randn(3, 15), w, A, B, 1.0)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        ops.qlora_linear(x, w, A, None, 1.0)
    with pytest.raises(ValueError, match=r"must be \[r, 16\] and \[8, r\]"):
        ops.qlora_linear(x, w, A, torch.randn(8, 3), 1.0)
    with pytest.raises(TypeError, match="lora_A must be a 2-D float"):
        ops.qlora_linear(x, w, A.int(), B, 1.0)
    with pytest.raises(ValueError, match=r"bias must be .* shape \(8,\)"):
        ops.qlora_linear(x, w, A, B, 1.0, bias=torch.randn(7))
    with pytest.raises(ValueError, match="dropout must be in"):
        ops.qlora_linear(x, w, A, B, 1.0, dropout=1.0)
    with pytest.raises(TypeError, match="NF4Weight"):
        ops.qlora_linear(x, torch.randn(8, 16), A, B, 1.0)
    # A malformed NF4Weight cannot reach the op: the type validates itself when built.
    with pytest.raises(ValueError, match="quant_type 'int8'"):
        nf4.NF4Weight(w.packed, w.absmax, w.shape, w.dtype, w.blocksize, "int8")
    with pytest.raises(ValueError, match="packed has 10 bytes, needs 64"):
        nf4.NF4Weight(w.packed[:10], w.absmax_fp32(), w.shape, w.dtype, w.blocksize)


@pytest.mark.parametrize("lora", [True, False])
def test_qlora_custom_ops_pass_opcheck(lora):
    torch.manual_seed(0)
    w = nf4.quantize(torch.randn(48, 64))
    x = torch.randn(2, 3, 64, requires_grad=True)
    A = torch.randn(4, 64, requires_grad=True) if lora else None
    B = torch.randn(48, 4, requires_grad=True) if lora else None
    backend_name = qlora._qlora_backend(x.device)
    torch.library.opcheck(torch.ops.forge_rt.qlora_linear.default,
                          (x, *qlora._w_parts(w), A, B, None, 0.5, 0.0, -1, backend_name))
    g = torch.randn(6, 48)
    gb, A = (g @ B.detach(), A.detach()) if lora else (None, None)  # a backward helper: not differentiable
    torch.library.opcheck(torch.ops.forge_rt.qlora_backward_input.default,
                          (g, *qlora._w_parts(w), gb, A, 0.5, backend_name))
