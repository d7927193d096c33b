"""What only a GPU can check (tools/gpu_check.sh runs these): the Triton kernels compiled for real in fp16 and
bf16 (the interpreter's bf16 tl.dot is wrong, so bf16 was never checked) against the reference over odd shapes;
the CUDA NF4 dequant; accelerate() on a CUDA model against stock PEFT over bitsandbytes; nvCOMP's GPU LZ4 round
trip of activation-like tensors. Skipped cleanly without CUDA."""
import pytest
import torch
import torch.nn.functional as F

from forge_rt import nf4
from forge_rt.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SHAPES = [(1, 17, 70), (5, 70, 130), (33, 130, 17), (20, 33, 200), (64, 256, 320), (257, 1000, 515)]
RANKS = [None, 1, 8, 33]
# fp32 reference from the same (rounded) inputs: fp16 keeps ~11 bits, bf16 ~8.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(m, n, k, r, dtype, blocksize=64, double_quant=True):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k + (r or 0))
    w = nf4.quantize(torch.randn(n, k, generator=g), blocksize, double_quant).to("cuda")
    rnd = lambda *s: torch.randn(*s, generator=g).to("cuda", dtype)  # noqa: E731
    lora = (rnd(m, r), rnd(n, r), rnd(m, r), rnd(r, k)) if r else (None,) * 4
    return w, rnd(m, k), rnd(m, n), rnd(n), lora


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_qlora_kernels_compiled_match_reference(m, n, k, r, dtype):
    from forge_rt.kernels import qlora_reference, qlora_triton
    w, x, gy, bias, (xa, B, gb, A) = _inputs(m, n, k, r, dtype)
    for kernel, args in (("forward", (x, w, xa, B, 0.5, bias)), ("backward_input", (gy, w, gb, A, 0.5))):
        out = getattr(qlora_triton, kernel)(*args)
        ref = getattr(qlora_reference, kernel)(*args)
        assert out.dtype == dtype and out.is_cuda
        assert rel_err(out.float(), ref.float()) <= TOL[dtype], kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_triton_and_cuda_nf4_dequant_match_the_cpu_decode(monkeypatch, dtype, blocksize):
    from forge_rt.core import backend
    from forge_rt.kernels import nf4_triton
    w = nf4.quantize(torch.randn(70, 130, generator=torch.Generator().manual_seed(0)), blocksize, True)
    ref = nf4.dequantize(w).float()  # C++ decode on the CPU
    wc = w.to("cuda")
    assert torch.equal(nf4_triton.dequantize(wc, torch.float32).cpu(), ref)
    if not backend.status()["cuda"][0]:
        pytest.skip(backend.status()["cuda"][1])
    monkeypatch.setenv("FORGE_RT_BACKEND", "cuda")
    got = nf4.dequantize(wc, dtype)
    assert got.is_cuda and got.dtype == dtype
    assert torch.equal(got.cpu(), ref.to(dtype))


def test_accelerate_on_cuda_matches_stock_peft_over_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    import forge_rt
    from forge_rt.bench.models import build
    from forge_rt.testing import lora_model, to_bnb4bit
    model, ids = build("tiny", 2, 2, 32)
    pm = lora_model(to_bnb4bit(model).to("cuda"), init_lora_weights=False)
    ids = ids.cuda()
    out = {}
    for mode in ("stock", "fused"):
        forge_rt.accelerate(pm, enable=mode == "fused")
        pm.zero_grad(set_to_none=True)
        res = pm(input_ids=ids, labels=ids)
        res.loss.backward()
        grads = [p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n]
        out[mode] = (res.logits.detach(), grads)
    assert rel_err(out["fused"][0], out["stock"][0]) <= 1e-4
    for a, b in zip(out["fused"][1], out["stock"][1]):
        assert rel_err(a, b) <= 1e-3


def _activations():
    g = torch.Generator().manual_seed(0)
    x = F.silu(torch.randn(3 * 65536 + 77, generator=g))
    yield "fp32", x
    yield "bf16-in-fp32", x.bfloat16().float()
    yield "bf16", x.bfloat16()
    yield "fp16 odd", x[:12345].half()
    yield "mask", (x > 0).to(torch.uint8)
    yield "zeros", torch.zeros(1 << 20)


@pytest.mark.parametrize("name,t", list(_activations()), ids=lambda v: v if isinstance(v, str) else "")
def test_nvcomp_gpu_lz4_round_trip_is_bit_exact(name, t):
    from forge_rt.pager import PagingError, cuda_lz4
    if not cuda_lz4.available():
        pytest.skip("forge_rt._C built without CUDA + nvCOMP")
    t = t.cuda()
    blob = cuda_lz4.compress(t)
    out = cuda_lz4.decompress(blob, torch.empty_like(t))
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
    bad = blob.clone()
    bad[-1] ^= 0xFF  # last payload byte: its chunk's CRC must catch it
    with pytest.raises(PagingError):
        cuda_lz4.decompress(bad, torch.empty_like(t))
