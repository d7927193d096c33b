"""python -m forge_rt.bench on a base install: --help and --compare need no extra; running the suite without
pytest-benchmark (the `test` extra) and a bad --only are one `error:` line each, exit 2."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

# The bench command with pytest hidden: its import fails as if the package were not installed.
NO_PYTEST = """
import runpy, sys
sys.modules["pytest"] = None
sys.argv = ["forge_rt.bench", *sys.argv[1:]]
runpy.run_module("forge_rt.bench", run_name="__main__")
"""


def _bench(*args):
    return subprocess.run([sys.executable, "-c", NO_PYTEST, *map(str, args)], capture_output=True, text=True,
                           env=ENV, timeout=300, check=False)


def _one_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), proc.stderr


def test_help_without_pytest():
    proc = _bench("--help")
    assert proc.returncode == 0 and "usage" in proc.stdout and "--compare" in proc.stdout, proc.stderr


def test_running_the_suite_without_the_test_extra_is_one_error_line(tmp_path):
    _one_error(_bench("--suite", "tiny", "--device", "cpu", "--out", tmp_path), "pytest",
               "pip install 'forge_rt[test]'")
    assert not list(tmp_path.iterdir())  # nothing written


def test_unknown_family_is_one_error_line(tmp_path):
    _one_error(_bench("--only", "kernels,warp", "--out", tmp_path), "--only", "warp", "kernels, nf4")
