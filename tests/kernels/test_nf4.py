"""forge_rt.nf4 against bitsandbytes 0.50 on CPU: packed bytes, absmax (and its double quantization),
dequantized values, zero-copy views of bitsandbytes weights, and bad input."""
import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from forge_rt import nf4, ops  # noqa: E402
from forge_rt.core.native import require_native as native  # noqa: E402

SHAPES = [(3, 5), (1, 1), (257, 129), (64, 128), (7,)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if w.numel() > 200:  # a few outliers and an all-zero block, as real weights have
        w.view(-1)[17] = 0.9
        w.view(-1)[128:256] = 0
    return w.to(dtype)


def _oracle_dequant(packed, qs, dtype):
    """bitsandbytes' definition with its own code book and 8-bit dequant: code[q] * absmax, flat blocks."""
    absmax = qs.absmax
    if qs.nested:
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    n = qs.shape.numel()
    b = packed.view(-1)
    q = torch.stack([b >> 4, b & 15], dim=1).view(-1)[:n].long()
    code = bnbF.get_4bit_type(qs.quant_type, device="cpu")
    return (code[q] * absmax.repeat_interleave(qs.blocksize)[:n]).view(qs.shape).to(dtype)


def _assert_same_format(w, packed, qs):
    assert torch.equal(w.packed, packed.view(-1))
    assert torch.equal(w.absmax, qs.absmax)
    assert w.shape == qs.shape and w.dtype == qs.dtype and w.blocksize == qs.blocksize
    if qs.nested:
        assert torch.equal(w.nested_absmax, qs.state2.absmax)
        assert torch.equal(w.nested_code, qs.state2.code)
        assert w.offset == float(qs.offset)
    else:
        assert w.nested_absmax is None


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bytes_and_dequant_match_bitsandbytes(dtype, blocksize, double_quant, quant_type):
    for i, shape in enumerate(SHAPES):
        w = _weight(shape, dtype, seed=i)
        packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type=quant_type)
        ours = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        _assert_same_format(ours, packed, qs)
        deq = nf4.dequantize(ours)
        assert deq.dtype == dtype and deq.shape == w.shape
        assert torch.equal(deq, _oracle_dequant(packed, qs, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_matches_bitsandbytes_cpu_kernel(dtype):
    # Rows holding whole blocks: bitsandbytes' C++ CPU dequantizer indexes absmax per row and is only
    # consistent with its quantizer for these; other shapes are checked against _oracle_dequant.
    w = _weight((96, 256), dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = nf4.quantize(w)
    assert torch.equal(nf4.dequantize(ours), bnbF.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_zeros_and_tiny_blocks(quant_type):
    code = bnbF.get_4bit_type(quant_type, device="cpu")
    srt = code.sort().values
    mids = (srt[:-1] + srt[1:]) / 2
    # absmax 1 so the midpoints arrive unscaled: a value on a midpoint goes to the lower code.
    block = torch.cat([torch.tensor([1.0]), mids, srt, torch.tensor([1e-3, -1e-3, 0.0, -0.0])])
    zeros = torch.zeros(64)  # absmax 0 (full block)
    tail = torch.zeros(5)  # trailing partial all-zero block: bitsandbytes stores absmax 1e-38
    w = torch.cat([block, torch.zeros(64 - block.numel()), zeros, tail])
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    ours = nf4.quantize(w, blocksize=64, double_quant=False, quant_type=quant_type)
    _assert_same_format(ours, packed, qs)
    assert ours.absmax[1] == 0 and ours.absmax[2] > 0


def test_header_code_book_and_nearest_code_via_binding():
    mod = native()
    for qt, idx in nf4.QUANT_TYPES.items():
        code = bnbF.get_4bit_type(qt, device="cpu")
        assert torch.equal(torch.tensor([mod.nf4_code_value(q, idx) for q in range(16)]), code)
        srt, order = code.sort(stable=True)
        bounds = (srt[:-1] + srt[1:]) / 2
        xs = torch.cat([torch.linspace(-1, 1, 301), bounds, srt])
        want = order[torch.bucketize(xs, bounds)]
        got = torch.tensor([mod.testing.nf4_quantize_scaled(float(x), idx) for x in xs])
        if qt == "fp4":  # +0 and -0 tie in value; bitsandbytes' argsort puts +0 (code 0) first
            want = torch.where((want == 8) & (xs <= 0), torch.zeros_like(want), want)
        assert torch.equal(got, want)


def test_double_quant_dynamic_code_matches_bitsandbytes():
    assert torch.equal(nf4.dynamic_code(), bnbF.create_dynamic_map())
    absmax = torch.rand(1000) * 0.3
    q, qs = bnbF.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    ours_q, nested, offset = nf4._quantize_absmax(absmax)
    assert torch.equal(ours_q, q) and torch.equal(nested, qs.absmax)
    assert offset == absmax.mean().item()


def test_from_bnb_and_to_bnb_share_storage():
    w = _weight((40, 128), torch.float32)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    view = nf4.NF4Weight.from_bnb(packed, qs)
    assert view.packed.data_ptr() == packed.data_ptr()
    assert view.absmax.data_ptr() == qs.absmax.data_ptr()
    assert view.nested_absmax.data_ptr() == qs.state2.absmax.data_ptr()
    assert torch.equal(nf4.dequantize(view), bnbF.dequantize_4bit(packed, qs))

    back, qs2 = view.to_bnb()
    assert back.data_ptr() == packed.data_ptr() and back.shape == packed.shape
    assert qs2.absmax.data_ptr() == qs.absmax.data_ptr()
    assert torch.equal(bnbF.dequantize_4bit(back, qs2), bnbF.dequantize_4bit(packed, qs))

    ours = nf4.quantize(w, double_quant=False)
    p3, qs3 = ours.to_bnb()
    assert p3.data_ptr() == ours.packed.data_ptr() and not qs3.nested
    assert torch.equal(bnbF.dequantize_4bit(p3, qs3), nf4.dequantize(ours))


def test_from_bnb_params4bit():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.float32, quant_type="fp4")
    lin.weight = bnb.nn.Params4bit(_weight((40, 128), torch.float32), requires_grad=False, quant_type="fp4")
    lin = lin.to("cpu")
    view = nf4.NF4Weight.from_bnb(lin.weight)
    assert view.packed.data_ptr() == lin.weight.data_ptr() and view.quant_type == "fp4"
    assert torch.equal(nf4.dequantize(view), bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state))


def test_absmax_fp32_is_cached_and_code_matches():
    w = nf4.quantize(_weight((8, 64), torch.float32))
    assert w.absmax_fp32() is w.absmax_fp32()
    assert w.absmax_fp32().dtype == torch.float32 and w.absmax_fp32().numel() == w.n_blocks
    assert torch.equal(w.code(), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("bad, match", [
    (torch.empty(0, 4), "no elements"),
    (torch.tensor(1.0), "no elements"),
    (torch.ones(4, 4, dtype=torch.float64), "float64"),
    (torch.ones(4, 4, dtype=torch.int32), "int32"),
    ([[1.0, 2.0]], "torch.Tensor"),
])
def test_bad_weights_rejected(bad, match):
    with pytest.raises(nf4.NF4Error, match=match):
        nf4.quantize(bad)


def test_bad_options_and_nonfinite_rejected():
    w = torch.ones(4, 64)
    with pytest.raises(nf4.NF4Error, match="quant_type 'int4'"):
        nf4.quantize(w, quant_type="int4")
    with pytest.raises(nf4.NF4Error, match="blocksize 100"):
        nf4.quantize(w, blocksize=100)
    w[2, 3] = float("nan")
    w[0, 0] = float("inf")
    with pytest.raises(nf4.NF4Error, match="2 NaN/inf"):
        nf4.quantize(w)


def test_from_bnb_rejects_unsupported_state():
    packed, qs = bnbF.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="nf4")
    qs.quant_type = "int4"
    with pytest.raises(nf4.NF4Error, match="quant_type 'int4'"):
        nf4.NF4Weight.from_bnb(packed, qs)
    qs.quant_type = "nf4"
    with pytest.raises(nf4.NF4Error, match="needs 128"):
        nf4.NF4Weight.from_bnb(packed[:10], qs)
    with pytest.raises(nf4.NF4Error, match="no QuantState"):
        nf4.NF4Weight.from_bnb(packed)


def test_cuda_kernel_built_when_extension_has_cuda():
    info = native().build_info()
    assert hasattr(native(), "nf4_dequantize_cuda") == bool(info["cuda"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_dequant_matches_cpu():
    for qt in ("nf4", "fp4"):
        w = nf4.quantize(_weight((257, 129), torch.float32), quant_type=qt)
        want = nf4.dequantize(w)
        got = nf4.dequantize(w.to("cuda"))
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("forced", ["reference", "cpu", "triton"])
def test_dequantize_agrees_across_backends(monkeypatch, forced):
    # Each backend of ops.dequantize against bitsandbytes' own dequantization of the same bytes.
    import bitsandbytes.functional as bnbf
    w = torch.randn(70, 130)
    q = nf4.quantize(w, blocksize=64, double_quant=True)
    packed, state = q.to_bnb()
    want = bnbf.dequantize_4bit(packed, state)
    monkeypatch.setenv("FORGE_RT_BACKEND", forced)
    torch.testing.assert_close(ops.dequantize(q), want, rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_code_books_are_independent_and_agree(quant_type):
    """The torch oracle's written-out code books equal bitsandbytes' and the C++ ones; the C++ decoder
    equals the oracle's decode of the same bytes."""
    from forge_rt.kernels import nf4_reference
    assert torch.equal(nf4_reference.code(quant_type), bnbF.get_4bit_type(quant_type, device="cpu").float())
    assert torch.equal(nf4_reference.code(quant_type), nf4._code(quant_type))
    for shape in SHAPES:
        w = nf4.quantize(_weight(shape, torch.float32), blocksize=64, quant_type=quant_type)
        assert torch.equal(nf4.dequantize(w, torch.float32), nf4_reference.dequantize(w, torch.float32))
