"""Data-parallel training under torchrun (issue 16), on CPU with gloo: 2 ranks give the single-process result
for the same global batch (per-step tokens, pre-clip gradient norms, losses, adapter, eval predictions), rank 0
alone writes the run, a dead rank stops the other at once and the run resumes with one process. Rank 1 is
held before step 3 (HOLD below) so that a signal or a kill lands at a known step of a 6-step run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from forge_rt.cli import train
from forge_rt.testing import make_tiny_model_dir, rel_err, tiny_args, tiny_rows, write_jsonl
from forge_rt.core import dist as distributed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(smol_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return (make_tiny_model_dir(root / "model", smol_tok), write_jsonl(root / "train.jsonl", tiny_rows()),
            write_jsonl(root / "eval.jsonl", tiny_rows(6)))


# sitecustomize for the workers: every rank appends its pre-clip gradient norm of each step to NORMS.rank<r>;
# rank 1 waits before optimizer step HOLD_AT until the file RELEASE exists.
HOOK = """
import os, time
import torch
from forge_rt.train import loop
rank, env = os.environ.get("RANK", "0"), os.environ
if env.get("FRT_TEST_NORMS"):
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        norm = real_clip(params, max_norm, *a, **k)
        with open(env["FRT_TEST_NORMS"] + ".rank" + rank, "a") as f:
            f.write(repr(float(norm)) + "\\n")
        return norm

    torch.nn.utils.clip_grad_norm_ = recording_clip
if env.get("FRT_TEST_HOLD_AT") and rank == "1":
    real_step = loop._step

    def held_step(model, tok_data, cfg, st, *a, **k):
        if st.step + 1 == int(env["FRT_TEST_HOLD_AT"]):
            while not os.path.exists(env["FRT_TEST_RELEASE"]):
                time.sleep(0.05)
        return real_step(model, tok_data, cfg, st, *a, **k)

    loop._step = held_step
"""


def _torchrun(n: int, args: list[str], tmp_path: Path, **hook_env: str) -> subprocess.Popen:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", **hook_env}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(n), "-m", "forge_rt.train", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _held(tiny, run: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A 2-rank, 6-step run whose rank 1 waits before step 3 until the returned file is created."""
    release = tmp_path / "release"
    proc = _torchrun(2, _args(tiny, run, "--max-steps", "6", "--no-eval", *extra), tmp_path,
                     FRT_TEST_HOLD_AT="3", FRT_TEST_RELEASE=str(release))
    _wait_for_checkpoint(proc, run, 2)
    return proc, release


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _args(tiny, out: Path, *extra: str) -> list[str]:
    model_dir, data, evals = tiny
    args = tiny_args(model_dir, data, out, "--max-steps", "4", "--lora-dropout", "0", "--eval-data", str(evals),
                     "--max-new-tokens", "4", "--eval-batch-size", "2", *extra)
    args.remove("--no-eval")
    return args


def test_two_ranks_equal_one_process_and_adapter_loads_in_peft(tiny, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    norms_one, real_clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda *a, **k: norms_one.append(float(n := real_clip(*a, **k))) or n)
    assert train.main(_args(tiny, one)) == 0
    monkeypatch.undo()
    proc = _torchrun(2, _args(tiny, two), tmp_path, FRT_TEST_NORMS=str(tmp_path / "norms"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    # Each step: the global batch's tokens once (not once per rank) and the gradient of the global mean loss
    # (a rank's part over the global label count: the pre-clip norm, before AdamW and clipping hide a scale).
    ta, tb = ([json.loads(l)["tokens"] for l in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two))
    assert tb == ta and len(ta) == 4 and min(ta) > 0
    assert len(norms_one) == 4 and min(norms_one) > 0
    for rank in (0, 1):
        norms = [float(x) for x in (tmp_path / f"norms.rank{rank}").read_text().split()]
        torch.testing.assert_close(norms, norms_one, rtol=1e-5, atol=0)
    from safetensors.torch import load_file
    a, b = (load_file(r / "adapter/adapter_model.safetensors") for r in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        assert rel_err(b[k], a[k]) <= 1e-5 or a[k].abs().max() == b[k].abs().max() == 0, k
    la, lb = ([json.loads(l)["loss"] for l in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two))
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert (mb["score_base"], mb["score_tuned"]) == (ma["score_base"], ma["score_tuned"])  # gathered eval
    # The predictions themselves (the random tiny model scores 0 either way): every rank's share gathered.
    assert mb["samples_tuned"] == ma["samples_tuned"] and len(ma["samples_tuned"]) == 5
    assert any(s["prediction"] for s in ma["samples_tuned"]), ma["samples_tuned"]
    assert mb["ppl_retention_base"] == pytest.approx(ma["ppl_retention_base"], rel=1e-6)
    assert mb["distributed"] == {"ranks": 2, "backend": "gloo", "rendezvous": "localhost"}
    # Rank 1 wrote only its memory record; rank 0 everything else (one memory picture per rank).
    assert (two / "memory.rank1.jsonl").is_file() and (two / "memory.rank1.png").is_file()
    assert sorted(p.name for p in two.iterdir()) == sorted([*(p.name for p in one.iterdir()),
                                                            "memory.rank1.jsonl", "memory.rank1.png"])
    assert "data-parallel: 2 ranks (gloo)" in (two / "report.md").read_text()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0]), two / "adapter")
    state = model.state_dict()
    key = next(k for k in b if k.endswith("lora_B.weight"))
    torch.testing.assert_close(state[key.replace(".weight", ".default.weight")], b[key])


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker for `rank` (a child of the launcher holding RANK=<rank>)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_dead_rank_stops_the_other_and_one_process_resumes(tiny, tmp_path):
    """Rank 1, held before step 3, is killed while rank 0 waits in step 3's all-reduce. The timeout is 300 s:
    the survivor must find the lost peer from the closed connection, not by waiting the timeout out."""
    run = tmp_path / "run"
    proc, _ = _held(tiny, run, tmp_path, "--checkpoint-every", "1", "--dist-timeout", "300")
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and time.time() - t0 < 30, (time.time() - t0, err[-3000:])
    # The surviving rank says why in one line (torchrun's own report of the killed worker follows it).
    assert err.count("error: rank 0 of 2 lost the other ranks") == 1, err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert _steps(run) == [1, 2] and not (run / "adapter").exists()
    # One process picks the run up from the global data position and finishes it.
    assert train.main(["--resume", str(run), "--no-live"]) == 0
    assert _steps(run) == list(range(1, 7)) and (run / "adapter/adapter_model.safetensors").is_file()


def test_a_lost_peer_is_said_even_when_torchruns_sigterm_follows(capsys):
    # torchrun SIGTERMs the survivors of a dead worker; when that lands after the collective failed (the
    # KeyboardInterrupt below), the cause must already be on stderr: CI once lost it to "interrupted".
    dist = distributed.Dist(rank=0, world=2, backend="gloo", timeout_s=30)
    with pytest.raises(KeyboardInterrupt):
        try:
            with dist._collective("the gradient all-reduce"):
                raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
        finally:
            raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert err.startswith("error: rank 0 of 2 lost the other ranks during the gradient all-reduce "
                          "([gloo] Connection closed by peer"), err
    assert "--resume RUN_DIR" in err and err.count("\n") == 1


def _wait_for_checkpoint(proc, run: Path, step: int) -> None:
    deadline = time.time() + 300
    while not (run / "checkpoints" / f"step-{step:08d}").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() else "slow"
        time.sleep(0.2)


def test_sigterm_to_one_rank_ends_every_rank_after_a_checkpoint(tiny, tmp_path):
    """SIGTERM reaches rank 1 alone while it is held before step 3; released, it carries the stop in step 3's
    all-reduce, and both ranks end after step 3, which rank 0 checkpoints (checkpoint-every is 2)."""
    run = tmp_path / "run"
    proc, release = _held(tiny, run, tmp_path, "--checkpoint-every", "2")
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # one worker only, not the launcher
    time.sleep(0.5)  # the handler runs in rank 1's hold loop
    release.touch()
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60, err[-3000:]
    # Both ranks stopped at the same step end (the all-reduce carries the stop): rank 0 checkpointed it.
    assert _steps(run) == [1, 2, 3], err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    # Each rank says how to continue; no traceback of ours (torchrun prints its own for the exit code 143).
    assert (out + err).count("Continue with: python -m forge_rt.train --resume") >= 1, (out + err)[-3000:]
    assert not re.search(r'File "[^"]*/forge_rt/', err), err[-3000:]
    assert "lost the other ranks" not in err  # a clean, agreed stop, not a lost peer
    assert train.main(["--resume", str(run), "--no-live"]) == 0  # one process finishes it
    assert _steps(run) == list(range(1, 7))


NAN_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import torch
    from forge_rt.train import loop
    real, calls = loop._loss, {"n": 0}

    def nan_at_third(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    loop._loss = nan_at_third
"""


def test_nan_on_one_rank_stops_every_rank(tiny, tmp_path):
    """Rank 1 alone computes a NaN loss at its third micro-batch (patched in through sitecustomize, in that
    process only): the all-reduced gradient carries it to rank 0, and both stop before the optimizer uses it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "forge_rt.train", *_args(tiny, run, "--max-steps", "8", "--checkpoint-every", "1",
                                                          "--no-eval")],
                          env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("diverged at step 3") >= 2, proc.stderr[-3000:]  # each rank says it, rank 0 included
    assert not (run / "adapter").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
