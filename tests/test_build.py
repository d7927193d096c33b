"""The extension as built: CUDA sources compiled where nvcc exists, nvCOMP linked, info CLI."""
import shutil
import subprocess
import sys

import pytest

from forge_rt.core.native import native
from forge_rt.core import backend


def test_extension_loads():
    assert native() is not None, "forge_rt._C failed to import"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_cuda_sources_compiled_when_nvcc_exists():
    # The build compiles csrc/*/*.cu whenever CMake finds nvcc; a CPU-only extension here means
    # the CUDA sources failed to configure or were skipped.
    assert native().build_info()["cuda"] is True


def test_nvcomp_linked():
    assert native().build_info()["nvcomp"] is True


def test_info_cli_reports_each_backend():
    out = subprocess.run([sys.executable, "-m", "forge_rt.info"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "cpu", "triton", "cuda", "nvcomp"):
        assert f"  {name}" in out
    assert "forge_rt 0.1.0" in out


def test_forced_backend_that_is_not_live_is_a_clear_error(monkeypatch):
    import torch
    monkeypatch.setenv("FORGE_RT_BACKEND", "cuda")
    if backend.status()["cuda"][0]:
        pytest.skip("CUDA is live here")
    with pytest.raises(RuntimeError, match="FORGE_RT_BACKEND='cuda' is not live"):
        backend.select(torch.zeros(1))
    monkeypatch.setenv("FORGE_RT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="choose one of"):
        backend.select(torch.zeros(1))


def test_test_hooks_live_only_in_the_testing_submodule():
    mod = native()
    hooks = ("compact_reference", "crc32c_table", "crc32c_hd", "stored_field", "bitshuffle", "bitunshuffle",
             "codec_last_slots", "codec_last_stored", "nf4_quantize_scaled")
    for name in hooks:
        assert hasattr(mod.testing, name)
        assert not hasattr(mod, name) and not hasattr(mod.paging, name)
    assert not hasattr(mod.paging.Codec, "last_slots")
