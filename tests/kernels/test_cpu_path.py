"""The extension's CPU paths (csrc/cpu_path.h): chosen at load by what the CPU has, reported by
cpu_features(), forced with FORGE_RT_CPU_PATH. The generic build of the SIMD kernels gives the AVX2+FMA
build's results: the same bytes for the paging codec and CRC-32C, and the fused qlora kernels within
fp32 rounding (FMA and vector lanes sum in another order)."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from forge_rt import nf4
from forge_rt.core.native import require_native
from forge_rt.kernels import qlora_cpu
from forge_rt.pager import TensorCodec
from forge_rt.testing import cpu_path, on_both_paths

C = require_native()
HAS_AVX2 = "avx2" in C.cpu_features()["available"]
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="this CPU or build has no AVX2+FMA path to compare with")


def test_forced_generic_path_is_reported():
    with cpu_path("generic"):
        f = C.cpu_features()
    assert f["selected"] == "generic" and f["simd"] in ("generic", "neon") and f["crc32c"] == "table"
    if HAS_AVX2:
        with cpu_path("auto"):
            assert C.cpu_features()["simd"] == "avx2"


def test_unknown_or_missing_path_is_refused():
    with pytest.raises(ValueError, match="use auto, generic or avx2"):
        C.testing.set_cpu_path("fastest")
    if not HAS_AVX2:
        with pytest.raises(ValueError, match="no AVX2"):
            C.testing.set_cpu_path("avx2")


def test_env_var_selects_the_path_at_load():
    code = ("from forge_rt.core.native import native, native_error; m = native(); "
            "print(m.cpu_features()['selected'] if m else native_error())")
    run = lambda value: subprocess.run([sys.executable, "-c", code], env={**os.environ, "FORGE_RT_CPU_PATH": value},  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout
    assert run("generic").strip() == "generic"
    assert "FORGE_RT_CPU_PATH=fastest: use auto, generic or avx2" in run("fastest")


# GEMV (M <= 4) and blocked GEMM paths; K = 128 takes the GEMV's 32-element decoder, K = 100 the
# per-block one with rows starting mid-byte and mid-block.
@needs_avx2
@pytest.mark.parametrize("M,K", list(itertools.product((1, 3, 7, 40), (128, 100))))
def test_qlora_kernels_agree(M, K):
    N, r = 48, 8
    g = torch.Generator().manual_seed(M * K)
    w = nf4.quantize(torch.randn(N, K, generator=g))
    x, gy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    A, B, bias = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), torch.randn(N, generator=g)
    run = lambda: (qlora_cpu.forward(x, w, x @ A.T, B, 0.5, bias), qlora_cpu.backward_input(gy, w, gy @ B, A, 0.5))  # noqa: E731
    (y, gx), (y_gen, gx_gen) = on_both_paths(run)
    torch.testing.assert_close(y_gen, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
    torch.testing.assert_close(gx_gen, gx, rtol=1e-5, atol=1e-5 * gx.abs().max().item())


def _activation(dtype: torch.dtype) -> torch.Tensor:
    t = torch.randn(300_001, generator=torch.Generator().manual_seed(7)) * 0.3
    t[::5] = 0  # runs as well as noise
    return t.bfloat16().float() if dtype == "bf16_in_fp32" else t.to(dtype)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, "bf16_in_fp32"])
def test_codec_blobs_are_identical(dtype):
    t = _activation(dtype)
    enc, enc_gen = on_both_paths(lambda: TensorCodec(min_ratio=0.0).encode(t))
    assert enc.half == enc_gen.half == (dtype == "bf16_in_fp32")
    assert [p.numpy().tobytes() for p in enc.pieces] == [p.numpy().tobytes() for p in enc_gen.pieces]
    with cpu_path("generic"):  # and each path restores the other's blob
        out = torch.empty_like(t)
        TensorCodec().decode(enc.pieces, out, enc.half, "t")
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_crc32c_agrees_on_every_path():
    for n in (0, 7, 8, 4096 + 3):
        b = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        crc, crc_gen = on_both_paths(lambda: C.paging.crc32c(b.data_ptr(), n))
        assert crc == crc_gen == C.testing.crc32c_table(b.data_ptr(), n)
