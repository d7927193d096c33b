"""What the export benches share (export_scores.py, export_retention.py): a finished run's metrics and config,
its importance matrix as the trainer's `--imatrix` collects it, and writing a record."""
from __future__ import annotations

import json
from pathlib import Path

from forge_rt.data import demo_paths, load_examples, tokenize_examples
from forge_rt.export.imatrix_collect import write_run_imatrix
from forge_rt.models import load_run


def run_files(run: Path) -> tuple[dict, dict]:
    """(metrics.json, config.json) of a finished run directory."""
    return json.loads((run / "metrics.json").read_text()), json.loads((run / "config.json").read_text())


def run_imatrix(run: Path, out: Path, max_len: int) -> dict:
    """One no-grad pass of the demo's training rows through the run's tuned model, written as llama.cpp's
    imatrix.dat at `out`."""
    model, tok, _ = load_run(run)
    data = tokenize_examples(load_examples(demo_paths()["train"]), tok, max_len)
    return write_run_imatrix(model, data.input_ids, out, dataset="demo train")


def save_record(record: dict, path: Path | None) -> None:
    """The record as JSON at `path`, or on stdout."""
    text = json.dumps(record, indent=1)
    if path is not None:
        path.write_text(text + "\n")
    else:
        print(text)


def add_row(record: dict, row: dict, path: Path | None) -> None:
    """Appends a case's row and saves the record as it goes: a case that fails keeps the ones before it."""
    record["results"].append(row)
    print(json.dumps(row), flush=True)
    save_record(record, path)


def finish_record(record: dict, path: Path | None) -> None:
    """The load average after the last case, and the record saved once more."""
    from forge_rt.bench.env import loadavg
    record["loadavg_after"] = loadavg()
    save_record(record, path)


def case_label(kind: str, quant: str, with_imatrix: bool) -> str:
    """An export case as the command line that writes it."""
    return f"--to {kind} --quant {quant}" + (" --imatrix" if with_imatrix else "")
