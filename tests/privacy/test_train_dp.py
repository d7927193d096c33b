"""The trainer's --dp-* and --audit on a tiny random Llama (short runs that prove the wiring): epsilon in
metrics.json and report.md equal to Opacus' figure for the recorded noise and rate, the accountant's state
kept across an interrupt and resume, the refusals (one error line each), and the canary audit from the
trainer and from `python -m forge_rt.audit RUN`."""
import json
import signal

import pytest
import torch

from forge_rt.cli import audit as audit_cli
from forge_rt.cli import train
from forge_rt.testing import make_tiny_model_dir, sigint_at_optimizer_step, tiny_args, tiny_rows, write_jsonl

DP = ("--dp-epsilon", "8", "--dp-clip", "0.5")


@pytest.fixture(scope="module")
def tiny(smol_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dp")
    return make_tiny_model_dir(root / "model", smol_tok), write_jsonl(root / "train.jsonl", tiny_rows())


def _opacus_epsilon(sigma, q, steps, delta):
    from opacus.accountants import RDPAccountant
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


def test_dp_run_reports_epsilon_and_resume_keeps_the_accountant(tiny, tmp_path, monkeypatch, capsys):
    model_dir, data = tiny
    full = tmp_path / "full"
    assert train.main(tiny_args(model_dir, data, full, *DP)) == 0
    m = json.loads((full / "metrics.json").read_text())
    dp = m["dp"]
    assert dp["steps"] == 6 and dp["sample_rate"] == 4 / 24 and dp["expected_batch"] == 4
    assert dp["epsilon_spent"] == pytest.approx(_opacus_epsilon(dp["noise_multiplier"], 4 / 24, 6, 1e-5), rel=1e-9)
    assert 7.9 < dp["epsilon_spent"] <= 8.0 and dp["clip"] == 0.5 and m["config"]["lora_dropout"] == 0.05
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in records] == sorted(r["epsilon"] for r in records)
    assert "## Differential privacy" in (full / "report.md").read_text()
    assert "dp: noise multiplier" in capsys.readouterr().out
    # interrupted during step 3, resumed: epsilon goes on from the checkpoint's accountant, not from zero
    real_step = torch.optim.AdamW.step
    sigint_at_optimizer_step(monkeypatch, 3)
    part = tmp_path / "part"
    assert train.main(tiny_args(model_dir, data, part, *DP)) == 128 + signal.SIGINT
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert train.main(["--resume", str(part), "--no-live"]) == 0
    resumed = json.loads((part / "metrics.json").read_text())["dp"]
    assert resumed["steps"] == 6 and resumed["epsilon_spent"] == pytest.approx(dp["epsilon_spent"], rel=1e-9)
    # resuming a finished run (e.g. to evaluate again) keeps the whole run's counts, not the steps since
    assert train.main(["--resume", str(full), "--no-live"]) == 0
    again = json.loads((full / "metrics.json").read_text())["dp"]
    assert again["examples_seen"] == dp["examples_seen"] > 0 and again["clipped_fraction"] == dp["clipped_fraction"]


def test_dp_batch_is_the_poisson_sample_run_in_micro_batches(tiny, tmp_path, monkeypatch):
    from forge_rt.train import loop
    model_dir, data = tiny
    sizes, real_batch = [], loop._batch
    monkeypatch.setattr(loop, "_batch", lambda tok_data, idx: (sizes.append(len(idx)), real_batch(tok_data, idx))[1])
    # --max-steps 0: one epoch, ceil(24 / 16) steps
    assert train.main(tiny_args(model_dir, data, tmp_path / "b", *DP, "--dp-batch", "16", "--max-steps", "0")) == 0
    dp = json.loads((tmp_path / "b" / "metrics.json").read_text())["dp"]
    assert dp["steps"] == 2 and dp["sample_rate"] == 16 / 24 and (dp["expected_batch"], dp["micro_batch"]) == (16, 4)
    assert max(sizes) <= 4 and sum(sizes) == dp["examples_seen"] > 4  # samples of ~16 in micro-batches of 4
    assert dp["epsilon_spent"] == pytest.approx(_opacus_epsilon(dp["noise_multiplier"], 16 / 24, 2, 1e-5), rel=1e-9)


@pytest.mark.parametrize("flags, says", [
    (("--pack",), "error: --dp-* with --pack"),
    (("--grad-accum", "2"), "error: --dp-* with --grad-accum 2"),
    (("--batch-size", "30"), "fewer than the batch of 30"),
    (("--dp-batch", "30"), "fewer than the batch of 30"),
    (("--dp-noise", "1.0"), "not both"),
    (("--dp-delta", "0.1"), "--dp-delta 0.1 is not below 1/n"),
])
def test_refusals(tiny, tmp_path, capsys, flags, says):
    model_dir, data = tiny
    assert train.main(tiny_args(model_dir, data, tmp_path / "r", *DP, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and says in err[-1], err


def test_audit_from_the_trainer_and_the_command(tiny, tmp_path, capsys):
    model_dir, data = tiny
    run = tmp_path / "audited"
    assert train.main(tiny_args(model_dir, data, run, "--audit", "--audit-candidates", "20", "--max-steps", "2")) == 0
    a = json.loads((run / "metrics.json").read_text())["audit"]
    assert a["canaries"] == 12 and a["candidates"] == 21 and len(a["table"]) == 12
    assert {(c["format"], c["repeats"]) for c in a["table"]} == {
        (f, r) for f in ("email", "card", "access_code", "passphrase") for r in (1, 4, 16)}
    assert all(c["base_exposure"] is not None and c["tuned_exposure"] is not None for c in a["table"])
    assert "## Canary audit" in (run / "report.md").read_text()
    # 24 rows + 4 formats x (1 + 4 + 16) canary rows were trained on
    assert json.loads((run / "metrics.json").read_text())["data"]["n_train"] == 24 + 4 * 21
    capsys.readouterr()
    assert audit_cli.main([str(run), "--candidates", "10"]) == 0
    out = capsys.readouterr().out
    assert "| access_code | no | 16 |" in out and json.loads((run / "audit" / "audit.json").read_text())["candidates"] == 11
    plain = tmp_path / "plain"
    write_jsonl(tmp_path / "few.jsonl", tiny_rows(8))
    assert train.main(tiny_args(model_dir, tmp_path / "few.jsonl", plain, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert audit_cli.main([str(plain)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not trained with --audit" in err
