"""LoRA dropout's counter-hash mask (csrc/qlora/dropout_hd.h, kernels/dropout_reference.py): the native
kernel gives the torch reference's bytes on both CPU paths; the reference gives the bits of the formula
computed with Python integers (an oracle sharing no code with either); and the mask behaves as
Bernoulli(1 - p) draws: the drop rate, no correlation between neighbours, a new mask per seed."""
import pytest
import torch

from forge_rt.core.native import require_native
from forge_rt.kernels import dropout_reference as ref
from forge_rt.kernels import qlora_cpu
from forge_rt.testing import on_both_paths

M32 = 0xFFFFFFFF


def py_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def py_bits(i: int, seed: int) -> int:
    k0, k1 = seed & M32, (seed >> 32) & M32
    return py_mix32((py_mix32(py_mix32(i & M32) ^ k0) + ((i >> 32) ^ k1)) & M32)


SEEDS = (0, 1, 12345, 2**32 - 1, 2**32, 2**61 + 977, 2**62 - 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_bits_are_the_formula_in_python_integers(seed):
    idx = [0, 1, 2, 4095, 4096, 123456789, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3]
    got = ref.bits(torch.tensor(idx, dtype=torch.int64), seed).tolist()
    assert got == [py_bits(i, seed) for i in idx]


@pytest.mark.parametrize("n", [0, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 100_003])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9])
def test_native_kernel_gives_the_reference_bytes_on_both_paths(n, p):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[::97] = 0.0
    for seed in (3, 2**45 + 11):
        want = ref.dropout(x, p, seed)
        fast, generic = on_both_paths(lambda: qlora_cpu.dropout(x, p, seed))  # noqa: B023
        assert torch.equal(fast.view(torch.int32), want.view(torch.int32))  # same bits, signed zeros included
        assert torch.equal(generic.view(torch.int32), want.view(torch.int32))


def test_native_kernel_follows_the_threshold_and_scale_at_the_edges():
    x = torch.ones(4096 * 3)
    out = qlora_cpu.dropout(x, 0.0, 5)
    assert torch.equal(out, x)  # p = 0: threshold 0 keeps everything, scale exactly 1
    out = qlora_cpu.dropout(x, 0.25, 5)
    kept = out != 0
    assert torch.equal(kept, ref.keep_mask(x.shape, 0.25, 5, "cpu"))
    assert torch.all(out[kept] == torch.tensor(1 / 0.75, dtype=torch.float32))
    inf = torch.full((4096,), float("inf"))
    dropped = ~ref.keep_mask(inf.shape, 0.5, 9, "cpu")
    assert torch.isnan(qlora_cpu.dropout(inf, 0.5, 9)[dropped]).all()  # x * 0, as torch's dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_is_bernoulli_like(p):
    n = 1 << 20
    drops = [~ref.keep_mask((n,), p, s, "cpu") for s in (1, 2, 2**33 + 1)]
    sigma = (p * (1 - p) / n) ** 0.5
    rates = [d.float().mean().item() for d in drops]
    for rate in rates:
        assert abs(rate - p) < 5 * sigma
    assert len(set(rates)) == len(rates)  # an aligned tensor's drop count depends on the seed
    d = drops[0].float()
    for lag in (1, 2, 8, 576, 4096):  # neighbours, SIMD lanes, a row of the demo model, a kernel block
        both = (d[:-lag] * d[lag:]).mean().item()
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5, lag
    for other in drops[1:]:  # seeds are independent, also at a shift (a mask is no shifted copy of another's)
        for shift in (0, 1, 2):
            both = (d[shift:] * other.float()[:n - shift]).mean().item()
            assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5


def test_every_backend_draws_the_same_mask():
    from forge_rt.kernels import qlora_reference
    x = torch.randn(33, 65)
    assert torch.equal(qlora_cpu.dropout(x, 0.1, 77), qlora_reference.dropout(x, 0.1, 77))
    assert torch.equal(ref.dropout(x.double(), 0.1, 77), ref.dropout(x, 0.1, 77).double())


def test_native_kernel_exists():
    assert hasattr(require_native(), "qlora_dropout")
