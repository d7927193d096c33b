"""The Pager's saved-tensor hooks: transparency (bit-identical grads, every dtype, non-contiguous,
checkpointing, dedup, unused saves), tiers and stats, no leak over 50 steps, and failures (bad or
full spill_dir, truncated or corrupted spill file, SIGINT)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import forge_rt
from forge_rt.pager import Pager, PagingError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Block(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))).transpose(0, 1).contiguous().transpose(0, 1))


def takes_o_direct(directory) -> bool:
    """Whether the filesystem under `directory` opens files with O_DIRECT (tmpfs does not)."""
    path = os.path.join(directory, "o_direct_probe")
    open(path, "wb").close()
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(path)


def make_model(dtype=torch.float32, n=3):
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(n)]).to(dtype)


def run(model, x, ckpt=None):
    model.zero_grad(set_to_none=True)
    h = x
    for blk in model:
        h = checkpoint(blk, h, use_reentrant=ckpt == "reentrant") if ckpt else blk(h)
    loss = h.float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(a, b):
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("dtype,ckpt,spill", [
    (torch.float32, None, False), (torch.float32, None, True), (torch.bfloat16, None, True),
    (torch.float32, "reentrant", True), (torch.bfloat16, "reentrant", False),
    (torch.bfloat16, "non_reentrant", True), (torch.float32, "non_reentrant", False),
    (torch.float32, None, "buffered")])
def test_grads_bit_identical(tmp_path, dtype, ckpt, spill):
    model = make_model(dtype)
    x = torch.randn(96, 256, dtype=dtype, requires_grad=ckpt == "reentrant")
    ref = run(model, x, ckpt)
    kw = dict(budget_bytes=32 * 1024, spill_dir=tmp_path, prefetch=2, direct_io=spill != "buffered") if spill else {}
    with forge_rt.paging(min_bytes=4096, **kw) as pager:
        got = run(model, x, ckpt)
        rec = pager.end_step()
        if spill:
            assert pager._tier.file.direct == (spill is True and takes_o_direct(tmp_path))
    assert_same(ref, got)
    assert rec["bytes_raw"] > 0
    assert (rec["bytes_spilled"] > 0) == bool(spill)


class SaveAll(torch.autograd.Function):
    """Saves arbitrary tensors for backward and checks there that they come back bit for bit."""

    @staticmethod
    def forward(ctx, x, *extra):
        ctx.save_for_backward(x, *extra)
        ctx.expect = [e.clone() for e in extra]
        ctx.strides = [e.stride() for e in extra]
        return x * 2

    @staticmethod
    def backward(ctx, g):
        x, *extra = ctx.saved_tensors
        for got, want, stride in zip(extra, ctx.expect, ctx.strides):
            assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == stride
            assert torch.equal(got.view(torch.uint8) if got.dtype != torch.bool and got.is_contiguous() else got, 
                               want.view(torch.uint8) if want.dtype != torch.bool and got.is_contiguous() else want)
        ctx.checked = True
        return (g * 2, *[None] * len(extra))


def saved_tensors():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 400, generator=g)
    out = [base.bfloat16().float(), base.half(), base.bfloat16(), base.double(), (base * 100).to(torch.int32),
           (base * 100).to(torch.int64), (base * 10).to(torch.int8), (base > 1), torch.zeros(300, 400, dtype=torch.uint8),
           base.t(), base[:, ::3], base.bfloat16()[10:250, 5:]]
    nan = base.clone()
    nan[::5] = float("nan")
    nan[1::7] = -0.0
    out.append(nan)
    out.append(torch.randint(0, 256, (300, 400), generator=g, dtype=torch.uint8))  # incompressible: kept raw
    return out


@pytest.mark.parametrize("spill", [False, True])
def test_every_dtype_and_layout_round_trips(tmp_path, spill):
    extra = saved_tensors()
    x = torch.randn(8, requires_grad=True)
    kw = dict(budget_bytes=0, spill_dir=tmp_path) if spill else {}
    with forge_rt.paging(min_bytes=4096, **kw) as pager:
        y = SaveAll.apply(x, *extra)
        y.sum().backward()
        s = pager.stats()
    assert torch.equal(x.grad, torch.full((8,), 2.0))
    assert s["bytes_compressed"] > 0 and s["bytes_incompressible"] >= 300 * 400  # the random bytes stay raw
    if spill:
        assert s["bytes_spilled"] > 0


def test_parameters_small_and_views_of_parameters_are_kept():
    lin = nn.Linear(512, 512)
    x = torch.randn(64, 512, requires_grad=True)  # so the weight is saved for x's grad
    with forge_rt.paging(min_bytes=1024) as pager:
        lin(x).sum().backward()
        s = pager.stats()
    assert s["bytes_kept"] >= 512 * 512 * 4  # the weight (saved for grad of x) is never paged


def test_same_storage_saved_twice_is_stored_once():
    x = torch.randn(256, 256, requires_grad=True)
    with forge_rt.paging() as pager:
        h = x * 1.0
        y = (h * h).sum()  # mul saves h twice
        y.backward()
        s = pager.stats()
    assert s["dedup_hits"] >= 1
    assert torch.equal(x.grad, 2 * x.detach())


def test_saved_but_unused_graph_is_freed(tmp_path):
    model = make_model()
    with forge_rt.paging(budget_bytes=128 * 1024, spill_dir=tmp_path, min_bytes=4096) as pager:
        loss = model(torch.randn(96, 256)).pow(2).mean()
        assert pager.stats()["spilled_now_bytes"] > 0
        del loss  # never backpropagated
        s = pager.stats()
    assert s["resident_bytes"] == 0 and s["spilled_now_bytes"] == 0


def test_no_leak_over_50_steps(tmp_path):
    model = make_model(n=2)
    x = torch.randn(64, 256)
    with forge_rt.paging(budget_bytes=200 * 1024, spill_dir=tmp_path, min_bytes=4096) as pager:
        for _ in range(50):
            run(model, x)
            pager.end_step()
        s = pager.stats()
    # Every step saves the same tensors. What reaches the disk is not compared step by step: the writer thread
    # races backward, which takes a record back from memory when its write has not landed yet (CI, under load).
    assert len({(rec["tensors"], rec["bytes_saved"]) for rec in pager.steps}) == 1
    assert s["bytes_spilled"] > 0
    assert s["resident_bytes"] == 0 and s["spilled_now_bytes"] == 0
    assert s["spill_file_bytes"] == 64 * 2**20  # the first reservation was reused, never grown
    assert not pager._tier.extents and not pager._tier.spilled and not pager._dedup and not pager._resident
    assert [r["step"] for r in pager.steps] == list(range(50))


def test_truncated_spill_file_is_detected(tmp_path):
    model = make_model()
    with forge_rt.paging(budget_bytes=0, spill_dir=tmp_path, min_bytes=4096, prefetch=0) as pager:
        loss = model(torch.randn(96, 256)).pow(2).mean()
        pager.flush()
        os.ftruncate(pager._tier.file.fd, 1000)
        with pytest.raises(PagingError, match=r"spill file .* is truncated: paged tensor #\d+ \("):
            loss.backward()


def test_corrupted_spill_bytes_are_detected(tmp_path):
    model = make_model()
    with forge_rt.paging(budget_bytes=0, spill_dir=tmp_path, min_bytes=4096) as pager:
        loss = model(torch.randn(96, 256)).pow(2).mean()
        pager.flush()
        fd = os.open(f"/proc/self/fd/{pager._tier.file.fd}", os.O_RDWR)  # a buffered handle: O_DIRECT needs whole blocks
        for extent, _ in list(pager._tier.extents.values()):
            os.pwrite(fd, b"\xff" * 16, extent.offset + extent.length // 2)
        os.close(fd)
        with pytest.raises(PagingError, match=r"paged tensor #\d+ .*(crc32|integrity)"):
            loss.backward()


def test_bad_arguments_and_missing_or_unwritable_dir(tmp_path):
    with pytest.raises(ValueError, match="spill_dir"):
        forge_rt.paging(budget_bytes=1)
    with pytest.raises(PagingError, match="does not exist"):
        forge_rt.paging(budget_bytes=1, spill_dir=tmp_path / "nope").__enter__()
    if os.geteuid() == 0:
        locked = "/sys"  # root ignores permission bits; sysfs refuses new files even to root
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    with pytest.raises(PagingError, match=f"spill_dir '{locked}' is not writable"):
        forge_rt.paging(budget_bytes=1, spill_dir=locked).__enter__()

FULL_DISK = """
    import resource, signal, sys, torch, forge_rt
    from forge_rt.pager import PagingError
    sys.path.insert(0, {tests!r})
    from test_paging import make_model, run
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG like a full disk, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
    try:
        forge_rt.paging(budget_bytes=0, spill_dir={d!r}, spill_reserve=8 << 20).__enter__()
    except PagingError as e:
        print("UPFRONT", e)
    model = make_model(n=6)
    try:
        with forge_rt.paging(budget_bytes=0, spill_dir={d!r}, spill_reserve=1 << 20, min_bytes=4096):
            run(model, torch.randn(256, 256))
    except PagingError as e:
        print("MIDSTEP", e)
"""


def test_full_spill_dir_up_front_and_mid_step(tmp_path):
    code = textwrap.dedent(FULL_DISK.format(tests=os.path.join(ROOT, "tests", "pager"), d=str(tmp_path)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert "UPFRONT" in out.stdout and "is full (preallocating" in out.stdout, out.stdout + out.stderr
    assert "MIDSTEP" in out.stdout and "is full" in out.stdout, out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []


def test_spill_file_gone_after_sigint(tmp_path):
    # The child takes SIGINT as a plain Python does, whatever mask or disposition it inherited from the runner
    # (one CI run, not reproduced since, left it pending for 60 s).
    code = textwrap.dedent(f"""
        import os, signal, sys, torch, forge_rt
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {os.path.join(ROOT, "tests", "pager")!r})
        from test_paging import make_model, run
        model = make_model()
        with forge_rt.paging(budget_bytes=0, spill_dir={str(tmp_path)!r}, min_bytes=4096) as pager:
            while True:
                run(model, torch.randn(96, 256))
                print("STEP", pager.stats()["bytes_spilled"], flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    line = proc.stdout.readline()
    assert line.startswith("STEP") and int(line.split()[1]) > 0, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        proc.kill()
        pytest.fail("SIGINT not taken within 60 s: " + " ".join(l for l in status.splitlines() if l.startswith("Sig")))
    assert "KeyboardInterrupt" in err
    assert list(tmp_path.iterdir()) == []


def test_backward_after_exit_with_spilled_tensors_says_why(tmp_path):
    model = make_model()
    with forge_rt.paging(budget_bytes=0, spill_dir=tmp_path, min_bytes=4096):
        loss = model(torch.randn(96, 256)).pow(2).mean()
    with pytest.raises(PagingError, match="exited"):
        loss.backward()


def test_close_is_idempotent_and_a_graph_freed_after_it_is_settled(tmp_path):
    model = make_model()
    pager = forge_rt.paging(budget_bytes=0, spill_dir=tmp_path, min_bytes=4096)
    with pager:
        loss = model(torch.randn(96, 256)).pow(2).mean()
        pager.flush()
        assert pager.stats()["spilled_now_bytes"] > 0
    pager.close()  # again: nothing left to stop
    del loss  # the graph, and with it every paged record, goes after the spill file is closed
    s = pager.stats()
    assert s["resident_bytes"] == 0 and s["spilled_now_bytes"] == 0
    assert not pager._tier.extents and not pager._tier.spilled and not pager._resident and not pager._dedup


def test_stats_keys_for_the_monitor():
    with Pager() as pager:
        make_model()(torch.randn(32, 256)).sum().backward()
        s = pager.stats()
        rec = pager.end_step()
    for k in ("bytes_raw", "bytes_compressed", "bytes_spilled", "ratio", "bytes_read_back", "codec_s", "stall_s"):
        assert k in s and k in rec
    assert pager.steps == [rec]


@pytest.mark.parametrize("release,spill", [(True, True), (False, True), (True, False), (None, False)])
def test_freed_heap_goes_back_without_changing_results(tmp_path, release, spill):
    model = make_model()
    x = torch.randn(96, 256)
    ref = run(model, x)
    kw = dict(budget_bytes=0, spill_dir=tmp_path) if spill else {}
    with forge_rt.paging(min_bytes=4096, release_memory=release, **kw) as pager:
        if release:
            pager._trimmer.every_bytes = 1  # trim after every release, so this small model exercises it
        got = run(model, x)
        s = pager.stats()
    assert_same(ref, got)
    assert (s["bytes_spilled"] > 0) == spill
    assert (s["heap_trims"] > 0) == bool(release)  # default: on with a budget only


def test_corrupted_raw_spilled_tensor_is_detected(tmp_path):
    """A tensor the codec skips (noise) is spilled as raw bytes; its extent's CRC-32C catches corruption."""
    noise = torch.randint(0, 256, (512 * 1024,), dtype=torch.uint8)
    x = torch.randn(8, requires_grad=True)
    with forge_rt.paging(budget_bytes=0, spill_dir=tmp_path, min_bytes=4096) as pager:
        y = SaveAll.apply(x, noise)
        pager.flush()
        assert pager.stats()["bytes_incompressible"] >= noise.numel()
        fd = os.open(f"/proc/self/fd/{pager._tier.file.fd}", os.O_RDWR)  # buffered: O_DIRECT needs whole blocks
        for extent, _ in list(pager._tier.extents.values()):
            os.pwrite(fd, b"\xff" * 16, extent.offset + extent.length // 2)
        os.close(fd)
        with pytest.raises(PagingError, match=r"paged tensor #\d+ .*fails its CRC-32C check"):
            y.sum().backward()
