"""python -m forge_rt.bench: a tiny suite end to end (record, table), --compare flagging a regression, the
NOTES.md suite block equal to what the committed records render, the step family's child, and tools/gpu_check.sh
--dry-run (wheels, build flags, test selection) without a GPU."""
import copy
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from forge_rt.bench import record

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "forge_rt.bench", "--suite", "tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left]" in proc.stderr  # the progress line
    (path,) = out.glob("suite-*-tiny-cpu.json")
    assert path.with_suffix(".md").read_text().startswith("Suite `tiny` on `cpu`")
    return path


def test_tiny_suite_writes_a_versioned_record_with_ratios(tiny_record):
    rec = record.load(tiny_record)
    assert rec["schema"] == record.SCHEMA and rec["suite"] == "tiny"
    assert {r["family"] for r in rec["rows"]} == {"kernels", "nf4", "paging"}
    # Every time, throughput and memory row is a ratio against a baseline measured in the same run.
    measured = [r for r in rec["rows"] if r["unit"] in ("ms", "s", "GB/s", "MiB", "tokens/s")]
    assert measured and [r["case"] for r in measured if "baseline" not in r] == []
    for r in measured:
        assert 0 < r["baseline_value"] < float("inf") and r["ratio"] == pytest.approx(r["value"] / r["baseline_value"])
    env = rec["env"]
    assert env["cpu"]["logical_cpus"] and env["versions"]["torch"] and env["memory"]["total_gib"]
    assert len(rec["loadavg"]["before"]) == 3 and len(rec["loadavg"]["after"]) == 3


def test_compare_flags_a_regression_beyond_noise(tiny_record, tmp_path):
    a = record.load(tiny_record)
    b = copy.deepcopy(a)
    slow = next(r for r in b["rows"] if r.get("better") == "lower" and "ratio" in r)
    slow["ratio"] *= 1.5
    record.save(b, tmp_path / "b.json")
    table, bad = record.compare(a, b)
    assert bad == 1 and "REGRESSION" in table
    proc = subprocess.run([sys.executable, "-m", "forge_rt.bench", "--compare", str(tiny_record),
                           str(tmp_path / "b.json")], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 1 and "REGRESSION" in proc.stdout
    assert record.compare(a, a)[1] == 0


def test_notes_block_is_what_the_committed_records_render():
    """NOTES.md's suite block and bench/results/suite-*.json cannot drift: rerun `python -m forge_rt.bench --notes`."""
    results = ROOT / "bench" / "results"
    assert record.notes_current(results / "NOTES.md") == record.notes_block(results)


def test_notes_rewrite_renders_the_newest_record(tiny_record, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / tiny_record.name).write_text(tiny_record.read_text())
    notes = results / "NOTES.md"
    notes.write_text(f"intro\n{record.BLOCK_BEGIN}\nstale\n{record.BLOCK_END}\nrest\n")
    proc = subprocess.run([sys.executable, "-m", "forge_rt.bench", "--notes", "--results", str(results)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and "rewritten" in proc.stdout, proc.stderr[-2000:]
    text = notes.read_text()
    assert "stale" not in text and tiny_record.name in text and text.endswith("rest\n")
    assert not record.rewrite_notes(notes, results)


def test_notes_show_each_familys_newest_record(tiny_record, tmp_path):
    old = record.load(tiny_record)
    new = copy.deepcopy(old)
    new["rows"] = [dict(r, value=r["value"] * 7 + 1234.5) for r in new["rows"] if r["family"] == "nf4"]
    new["skipped"] = [{"family": "generate", "why": "no llama.cpp here"}]
    results = tmp_path / "results"
    results.mkdir()
    record.save(old, results / "suite-20260101T000000-quick-cpu.json")
    record.save(new, results / "suite-20260102T000000-quick-cpu.json")
    block = record.notes_block(results)
    assert "suite-20260101T000000" in block and "suite-20260102T000000" in block
    shown = [line for line in block.splitlines() if line.startswith("| nf4 |")]
    assert shown and all(line in record.markdown(new) for line in shown)  # only the newer nf4 rows
    assert any(line.startswith("| kernels |") for line in block.splitlines())  # older families still shown
    assert "no llama.cpp here" in block


def test_step_child_runs_one_configuration_in_process():
    from forge_rt.bench.cases import step
    res = step.child("forge fused + paging", dict(kind="tiny", layers=1, batch=1, seq=16, steps=2), "cpu")
    assert res["step_s"] > 0 and res["peak_mib"] > 0


def test_gpu_check_dry_run_finds_wheels_flags_and_gpu_tests(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("nvidia_libnvcomp_cu13-5.0.0-py3-none-manylinux_2_28_x86_64.whl",
                 "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"):
        with zipfile.ZipFile(wheels / name, "w") as z:
            z.writestr("x", "y")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          env={**ENV, "FORGE_WHEELS": str(wheels), "OUT": str(tmp_path / "out"),
                               "PYTHON": sys.executable, "FORGE_RT_CUDA_ARCHS": "87"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nvidia_libnvcomp_cu13-5.0.0" in proc.stdout and "bitsandbytes-0.50.2" in proc.stdout
    assert "-DFORGE_RT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87" in proc.stdout
    selected = (tmp_path / "out" / "gpu-tests.txt").read_text()
    assert "test_triton_qlora_kernels_compiled_match_reference" in selected and "bf16" in selected
    assert "test_nvcomp_gpu_lz4_round_trip_is_bit_exact" in selected
    assert (tmp_path / "out" / "summary.txt").read_text().strip().endswith("dry run: OK")


def test_broken_wheel_fails_the_dry_run(tmp_path):
    (tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl").write_text("not a zip")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          env={**ENV, "FORGE_WHEELS": str(tmp_path), "OUT": str(tmp_path / "out"),
                               "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 1 and "BROKEN wheel" in proc.stdout
