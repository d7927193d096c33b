"""Fault injection (issue 12): each fault ends with exit code 2 and one `error:` line naming the thing and
the fix, no traceback, nothing previously written lost, and no NaN adapter on disk."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forge_rt.cli import train
from forge_rt.testing import tiny_args, tiny_rows, write_jsonl
from forge_rt.train import checkpoint as ckpt
from forge_rt import models as model_load

REPO = Path(__file__).resolve().parents[2]


def _one_error(err: str, *needles: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert "Traceback" not in err, err
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _fails(argv, capsys, *needles) -> str:
    assert train.main(argv) == 2
    return _one_error(capsys.readouterr().err, *needles)


def _cli(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """A command line in a subprocess; `unprivileged` drops root's permission bypass (DAC override)."""
    cmd = [sys.executable, "-m", *args]
    if unprivileged and os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _strict_records(run: Path) -> list[dict]:
    def no_nan(c):
        raise AssertionError(f"bare {c} in metrics.jsonl")
    return [json.loads(l, parse_constant=no_nan) for l in (run / "metrics.jsonl").read_text().splitlines()]


# --- item 3: hyper-parameters and divergence ------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (("--lr", "nan"), "lr must be a finite number"), (("--lr", "inf"), "lr must be a finite number"),
    (("--lr", "1e6"), "lr must be in (0, 1]"), (("--weight-decay", "-0.1"), "weight_decay must be >= 0"),
    (("--max-steps", "-3"), "max_steps must be >= 0"), (("--log-every", "0"), "log_every must be >= 1"),
    (("--max-len", "1"), "max_len must be >= 2"), (("--target-modules", ","), "names no module"),
    (("--lora-alpha=-inf",), "lora_alpha must be a finite number"),
    (("--dp-batch", "64"), "--dp-* needs one of --dp-epsilon")])
def test_bad_hyperparameters_refused_up_front(tiny, tmp_path, capsys, no_model_load, flags, needle):
    _fails(tiny_args(*tiny, tmp_path / "run", *flags), capsys, needle)
    assert not (tmp_path / "run").exists()


def test_nonfinite_gradient_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def clip_then_nan(params, max_norm, *a, **k):
        calls["n"] += 1
        norm = real_clip(params, max_norm, *a, **k)
        return torch.tensor(float("nan")) if calls["n"] == 5 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_nan)
    run = tmp_path / "run"
    _fails(tiny_args(*tiny, run), capsys, "diverged at step 5", "gradient norm is nan", "step-00000004", "--lr")
    assert not (run / "adapter").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in _strict_records(run)] == [1, 2, 3, 4]
    weights = ckpt.load_checkpoint(run / "checkpoints" / "step-00000004")["weights"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_loss_blowup_warns_then_stops(tmp_path, capsys):
    from forge_rt.train.config import TrainConfig
    from forge_rt.train.loop import DivergenceError, DivergenceGuard
    guard = DivergenceGuard(TrainConfig(lr=0.5), tmp_path, None)
    guard.check_trend(1, 0.0, 0)  # [DP] an empty Poisson sample measures no loss: not the start
    for step, loss in enumerate([2.0, 1.8, 7.0, 1.9], start=2):  # one spike over 3x, then back: warned only
        guard.check_trend(step, loss, 100)
    assert guard.healthy and capsys.readouterr().err.count("warning: step 4") == 1
    guard.check_trend(6, 10.8, 100)
    guard.check_trend(7, 10.8, 100)
    assert not guard.healthy
    with pytest.raises(DivergenceError, match="diverged at step 8: the loss 10.8 is over 3x the starting loss 2 for 3 steps"):
        guard.check_trend(8, 10.8, 100)


# --- item 2: --overwrite ----------------------------------------------------------------------------
def test_overwrite_keeps_the_old_run_until_the_new_one_has_an_adapter(tiny, tmp_path, capsys):
    model_dir, data = tiny
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    _fails(tiny_args(model_dir, bad, run, "--overwrite"), capsys, str(bad), "completion")
    broken = tmp_path / "broken_model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    _fails(tiny_args(broken, data, run, "--overwrite"), capsys, str(broken), "is truncated", "untouched")
    assert (run / "keep.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl", "broken_model", "run"]
    assert train.main(tiny_args(model_dir, data, run, "--overwrite", "--max-steps", "2")) == 0
    assert not (run / "keep.txt").exists() and (run / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "broken_model", "run"]


# --- item 5: resume ---------------------------------------------------------------------------------
def test_resume_refuses_changes_to_model_or_data_order_before_writing(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_args(*tiny, run, "--max-steps", "2")) == 0
    config = (run / "config.json").read_bytes()
    _fails(["--resume", str(run), "--lora-r", "8"], capsys, "cannot change lora_r 4 -> 8", "--output")
    _fails(["--resume", str(run), "--batch-size", "2", "--data", "other.jsonl"], capsys, "batch_size 4 -> 2",
           "data ", "data order")
    assert (run / "config.json").read_bytes() == config


def test_corrupt_newest_checkpoint_falls_back_and_half_written_tmp_is_cleaned(tiny, tmp_path, capsys):
    full, run = tmp_path / "full", tmp_path / "run"
    assert train.main(tiny_args(*tiny, full)) == 0
    assert train.main(tiny_args(*tiny, run, "--max-steps", "6", "--checkpoint-every", "2")) == 0
    shutil.rmtree(run / "adapter")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]  # the newest two are kept
    (run / "checkpoints" / "step-00000006" / "weights.safetensors").write_bytes(b"garbage")
    (run / "checkpoints" / ".tmp-step-00000008-4242").mkdir()
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--no-live"]) == 0
    out = capsys.readouterr()
    assert "step-00000006 is unreadable" in out.err and "trying the previous checkpoint" in out.err
    assert "removed the half-written checkpoint" in out.out
    assert not (run / "checkpoints" / ".tmp-step-00000008-4242").exists()
    a, b = _strict_records(full), _strict_records(run)
    torch.testing.assert_close([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-4, atol=1e-5)


def test_disk_full_writing_the_adapter_keeps_a_resumable_state(tiny, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    real_save = PeftModel.save_pretrained

    def full_disk(self, path, *a, **k):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(PeftModel, "save_pretrained", full_disk)
    run = tmp_path / "run"
    _fails(tiny_args(*tiny, run), capsys, "could not write", "adapter", "No space left on device",
           "step-00000006 is intact", f"--resume {run}")
    assert not (run / "adapter").exists() and not list(run.glob(".adapter*"))
    monkeypatch.setattr(PeftModel, "save_pretrained", real_save)
    assert train.main(["--resume", str(run), "--no-live"]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 1000


def test_disk_full_first_checkpoint_says_none_exists(tmp_path, monkeypatch):
    def full(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "_write_safetensors", full)
    with pytest.raises(ckpt.CheckpointError, match="no earlier checkpoint to resume from"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 1, {"w": torch.ones(2)}, {}, {}, {"epoch": 0, "pos": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []


# --- item 4: scrubbing covers every text, the run directory is owner-only ----------------------------
def test_scrub_covers_eval_and_retention_and_run_dir_is_owner_only(tiny, tmp_path):
    model_dir, data = tiny
    pii = ["ana.lopez@example.org", "+1 415 555 0142", "4111 1111 1111 1111"]
    evals = tiny_rows(3)
    for row, value in zip(evals, pii):
        row["prompt"] += f" Contact {value}."
        row["completion"] = row["completion"][:-1] + f', "contact": "{value}"}}'
    eval_path = write_jsonl(tmp_path / "eval.jsonl", evals)
    retention = tmp_path / "retention.txt"
    retention.write_text("General prose about pumps and valves.\nWrite to ana.lopez@example.org for more.\n" * 4)
    run = tmp_path / "run"
    args = tiny_args(model_dir, data, run, "--max-steps", "2", "--eval-data", str(eval_path), "--max-new-tokens", "2",
                     "--retention-text", str(retention))
    args.remove("--no-eval")
    assert train.main(args) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["scrub"]["scope"] == ["train", "eval", "retention"] and m["scrub"]["total_findings"] >= 4
    for path in run.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))
        if path.is_file():
            data_bytes = path.read_bytes()
            for value in pii + ["555 0142", "example.org"]:
                assert value.encode() not in data_bytes, (path, value)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700


# --- item 7: one error line instead of a traceback ------------------------------------------------------
def test_csv_and_parquet_name_the_supported_formats(tiny, tmp_path, capsys, no_model_load):
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,completion\na,b\n")
    _fails(tiny_args(tiny[0], csv, tmp_path / "run"), capsys, "CSV files are not supported", "JSONL", "to_json")
    parquet = tmp_path / "data.bin"
    parquet.write_bytes(b"PAR1" + b"\0" * 32)
    _fails(tiny_args(tiny[0], parquet, tmp_path / "run"), capsys, "Parquet", "JSONL")


def test_utf8_bom_and_yaml_exponent_are_accepted(tmp_path):
    from forge_rt.train.config import ConfigError, resolve
    from forge_rt.data import load_examples
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in tiny_rows(2)).encode())
    assert len(load_examples(bom)) == 2
    yml = tmp_path / "c.yaml"
    yml.write_bytes(b"\xef\xbb\xbflr: 1e-4\nmax_steps: '7'\n")
    cfg, _ = resolve(["--config", str(yml)])
    assert (cfg.lr, cfg.max_steps) == (1e-4, 7)
    yml.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr must be float, got the text 'fast'"):
        resolve(["--config", str(yml)])


def test_unreadable_data_and_read_only_output(tiny, tmp_path):
    """Real permission checks: as root these run without the permission bypass (setpriv)."""
    data = write_jsonl(tmp_path / "locked.jsonl", tiny_rows(2))
    data.chmod(0)
    out = _cli("forge_rt.train", *tiny_args(tiny[0], data, tmp_path / "run"), unprivileged=True)
    assert out.returncode == 2, out.stderr
    _one_error(out.stderr, str(data), "permission denied", "chmod u+r")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    out = _cli("forge_rt.train", *tiny_args(tiny[0], tiny[1], readonly / "run"), unprivileged=True)
    assert out.returncode == 2, out.stderr
    _one_error(out.stderr, str(readonly / "run"), "Permission denied", "writable --output")


def test_seal_verify_of_a_missing_file(tmp_path, capsys, monkeypatch):
    from forge_rt.cli import seal
    monkeypatch.setenv("FORGE_RT_PASSPHRASE", "pw")
    assert seal.main(["verify", str(tmp_path / "nope.sealed")]) == 2
    _one_error(capsys.readouterr().err, "nope.sealed: no such file")


def test_missing_layer_and_non_causal_model_refused_before_training(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model_dir, data = tiny
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    _fails(tiny_args(partial, data, tmp_path / "run"), capsys, "does not hold 9 tensor(s)",
           "model.layers.1.input_layernorm.weight", "incomplete")
    from transformers import BertConfig, BertForMaskedLM
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, bert / f)
    _fails(tiny_args(bert, data, tmp_path / "run"), capsys, "BertForMaskedLM", "not a causal language model",
           "ForCausalLM")
    assert not (tmp_path / "run").exists()


# --- item 8: a sealed adapter is bound to its run ----------------------------------------------------
def test_sealed_adapter_from_another_run_is_refused(tiny, tmp_path, capsys, monkeypatch):
    from forge_rt.cli import generate
    from forge_rt.sovereign.seal import BindingMismatchError
    monkeypatch.setenv("FORGE_RT_PASSPHRASE", "correct horse")
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert train.main(tiny_args(*tiny, run, "--max-steps", "1", "--seal")) == 0
    model_load.load_run(a)  # its own run: accepted
    shutil.copy(a / "adapter.sealed", b / "adapter.sealed")
    ident_a, ident_b = model_load.run_identity(a), model_load.run_identity(b)
    with pytest.raises(BindingMismatchError, match=f"sealed for run {ident_a[:16]}.*this run directory is run {ident_b[:16]}"):
        model_load.load_run(b)
    capsys.readouterr()
    assert generate.main(["--run", str(b), "hello"]) == 2
    _one_error(capsys.readouterr().err, "another run's adapter")
    monkeypatch.setenv("FORGE_RT_PASSPHRASE", "wrong")
    assert generate.main(["--run", str(a), "hello"]) == 2
    _one_error(capsys.readouterr().err, "wrong passphrase")


# --- item 9: --isolate -------------------------------------------------------------------------------
_RAW_CONNECT = r"""
import ctypes, errno, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", 80, socket.inet_aton("93.184.216.34"))
rc = libc.connect(fd, addr, len(addr))
print("connect", rc, errno.errorcode.get(ctypes.get_errno()))
print("interfaces", sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]))
"""


def _isolation_or_skip():
    from forge_rt.sovereign import isolate
    try:
        isolate.check_available()
    except isolate.IsolationError as exc:
        pytest.skip(str(exc))
    return isolate


def test_isolated_raw_libc_connect_fails(tmp_path, capfd):
    isolate = _isolation_or_skip()
    assert isolate.run_isolated([sys.executable, "-c", _RAW_CONNECT]) == 0
    out = capfd.readouterr().out
    assert "connect -1 ENETUNREACH" in out and "interfaces ['lo']" in out


def test_train_isolate_runs_in_a_network_namespace(tiny, tmp_path, capfd):
    _isolation_or_skip()
    run = tmp_path / "run"
    assert train.main(tiny_args(*tiny, run, "--max-steps", "1", "--isolate")) == 0
    assert "new network namespace" in capfd.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["isolated"] is True


def test_isolate_says_plainly_when_it_cannot(monkeypatch):
    from forge_rt.sovereign import isolate
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: type("L", (), {"unshare": staticmethod(lambda f: -1)})())
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.EPERM)
    with pytest.raises(isolate.IsolationError, match="does not allow a new network namespace .Operation not permitted"):
        isolate.check_available()
