"""RSS a training run pays for its tokenizer: a child process imports forge_rt's loader (the runtime the planner
counts apart), then calls `load_tokenizer` once and a second time; its VmRSS is polled from outside (this
process reads /proc/PID/status) at each pause. The planner's tokenizer part (plan.estimate.TOKENIZER_BYTES)
is fitted to the first call's growth.

    .venv/bin/python bench/tokenizer_rss.py [GGUF ...] [--out bench/results/tokenizer_rss.json]
(default: the shipped SmolLM2-135M-Instruct Q4_1)"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys
from forge_rt.models.load import load_tokenizer
print("imported", flush=True); sys.stdin.readline()
tok = load_tokenizer(sys.argv[1])
print(len(tok), flush=True); sys.stdin.readline()
again = load_tokenizer(sys.argv[1])
print("again", flush=True); sys.stdin.readline()
"""


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def measure(path: Path) -> dict:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    marks = {}
    try:
        for name in ("imported", "first_load", "second_load"):
            out = child.stdout.readline().strip()
            if not out:
                raise RuntimeError(f"the child stopped before {name} (exit {child.wait()})")
            marks[name] = _rss(child.pid)
            if name == "first_load":
                marks["vocab"] = int(out)
            child.stdin.write("\n")
            child.stdin.flush()
    finally:
        child.wait(timeout=60)
    mib = 1 << 20
    return {"gguf": path.name, "vocab": marks["vocab"], "rss_imported_mib": round(marks["imported"] / mib, 1),
            "first_load_mib": round((marks["first_load"] - marks["imported"]) / mib, 1),
            "second_load_mib": round((marks["second_load"] - marks["first_load"]) / mib, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="*")
    ap.add_argument("--out", default="bench/results/tokenizer_rss.json")
    args = ap.parse_args(argv)
    from forge_rt.models import default_gguf_path
    paths = [Path(p) for p in args.gguf] or [default_gguf_path()]
    record = {"command": "python bench/tokenizer_rss.py " + " ".join(args.gguf), "load_start": os.getloadavg(),
              "files": [measure(p) for p in paths]}
    record["load_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["files"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
