"""Replay of memory.jsonl: picture, peak table, bad lines, following a growing file, CLI."""
import json
import struct
import time

import pytest

from forge_rt.cli import memmap
from forge_rt.monitor import watch
from forge_rt.monitor.replay import NoRecordError, RecordFollower, RecordWarning, load, summary
from forge_rt.monitor.ui.plot import render

MIB = 1 << 20


def _png_size(path):
    # Read the IHDR chunk directly rather than trusting matplotlib to report what it wrote.
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _synthetic(path):
    """Two steps by hand: RSS peaks in step 2's forward, raw paged bytes in step 1's backward boundary."""
    recs = [{"type": "start", "time": 0.0, "interval": 0.1, "sources": {"proc": "ok", "cuda": "missing: no GPU"},
             "budget_bytes": 900 * MIB, "warn_available": 100 * MIB}]
    rss = [100, 300, 500, 350, 150, 120, 320, 640, 400, 130]
    raw = [0, 200, 400, 450, 100, 0, 220, 430, 90, 0]
    phases = {0: ("forward", 1), 3: ("backward", 1), 5: ("forward", 2), 8: ("backward", 2)}
    for i, (r, p) in enumerate(zip(rss, raw)):
        t = i * 0.1
        recs.append({"type": "sample", "t": t, "rss": r * MIB, "rss_peak": max(rss[:i + 1]) * MIB,
                     "mem_total": 4096 * MIB, "mem_available": (3000 - r) * MIB, "sys_used": (1096 + r) * MIB,
                     "swap_used": 0, "page_raw": p * MIB, "page_compressed": p * MIB // 2, "page_ratio": 2.0})
        if i in phases:
            recs.append({"type": "mark", "t": t + 0.001, "phase": phases[i][0], "step": phases[i][1]})
    recs.append({"type": "stop", "t": 1.0, "peaks": {}})
    _write(path, recs)
    return recs


def test_render_png_of_requested_size_from_a_recorded_run(tmp_path):
    pager = type("P", (), {"stats": lambda self: {"bytes_raw": 40 * MIB, "bytes_compressed": 20 * MIB,
                                                  "bytes_spilled": 5 * MIB, "ratio": 1.6}})()
    with watch(tmp_path, interval=0.01, paging=pager) as mon:
        for step in (1, 2):
            for phase in ("forward", "backward", "optimizer"):
                mon.mark(phase, step)
                time.sleep(0.03)
    record = load(tmp_path)
    png = render(record, size=(800, 500))
    assert png == tmp_path / "memory.png"
    assert _png_size(png) == (800, 500)
    assert _png_size(render(record, tmp_path / "big.png", size=(1600, 900), dpi=150)) == (1600, 900)

    import matplotlib.image
    pixels = matplotlib.image.imread(png)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::37]}) > 20  # drawn, not blank


def test_summary_peaks_match_samples_and_phase(tmp_path):
    recs = _synthetic(tmp_path / "memory.jsonl")
    rows = {r["pool"]: r for r in summary(load(tmp_path))}
    samples = [r for r in recs if r["type"] == "sample"]
    for pool in ("rss", "page_raw", "page_compressed", "sys_used", "rss_peak"):
        assert rows[pool]["peak"] == max(s[pool] for s in samples)
    assert (rows["rss"]["peak"], rows["rss"]["t"], rows["rss"]["phase"], rows["rss"]["step"]) == \
        (640 * MIB, pytest.approx(0.7), "forward", 2)
    # The raw peak sample at t=0.3 was taken just before the backward mark: it belongs to forward.
    assert (rows["page_raw"]["phase"], rows["page_raw"]["step"]) == ("forward", 1)
    assert "cuda_allocated" not in rows
    spans = load(tmp_path).phase_spans()
    assert [(p, s) for _, _, p, s in spans] == [("forward", 1), ("backward", 1), ("forward", 2), ("backward", 2)]
    assert spans[-1][1] == 1.0


def test_corrupt_and_truncated_lines_skipped_with_warning(tmp_path):
    recs = _synthetic(tmp_path / "memory.jsonl")
    lines = (tmp_path / "memory.jsonl").read_text().splitlines(keepends=True)
    lines.insert(2, "{not json at all\n")
    lines.insert(4, '{"type": "sample"}\n')       # no time
    lines.insert(6, '["a", "list"]\n')
    lines[-1] = lines[-1][: len(lines[-1]) // 2]  # the stop record cut mid-write
    (tmp_path / "memory.jsonl").write_text("".join(lines))
    with pytest.warns(RecordWarning) as caught:
        record = load(tmp_path)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 4
    assert "line 3 skipped: not JSON" in msgs[0] and "line 5 skipped: no numeric 't'" in msgs[1]
    assert "line 7 skipped: not a record" in msgs[2] and f"line {len(lines)} skipped: not JSON" in msgs[3]
    assert len(record.samples) == sum(r["type"] == "sample" for r in recs)
    assert record.stop is None and len(record.marks) == 4
    assert _png_size(render(record, size=(640, 400))) == (640, 400)


def test_follower_reads_only_complete_lines(tmp_path):
    path = tmp_path / "memory.jsonl"
    recs = _synthetic(path)
    text = path.read_text()
    cut = text.index('"type": "sample"', 600)  # somewhere inside a line
    path.write_text(text[:cut])
    follower = RecordFollower(tmp_path)
    follower.poll()
    n_first = len(follower.record.samples)
    assert follower.view.header["budget_bytes"] == 900 * MIB and not follower.finished
    with open(path, "a") as fh:
        fh.write(text[cut:])
    follower.poll()
    assert follower.finished
    assert n_first < len(follower.record.samples) == sum(r["type"] == "sample" for r in recs)
    assert follower.view.peaks()["rss"] == 640 * MIB and follower.view.phase == "backward"


def test_cli_writes_png_and_table(tmp_path, capsys):
    _synthetic(tmp_path / "memory.jsonl")
    assert memmap.main([str(tmp_path), "--size", "700x420"]) == 0
    out = capsys.readouterr().out
    assert "memory peaks" in out and "640.0 MiB" in out and "\x1b" not in out
    assert _png_size(tmp_path / "memory.png") == (700, 420)

    assert memmap.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no memory record here" in err[0]
    with pytest.raises(NoRecordError):   # a FileNotFoundError for library callers
        load(tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        memmap.main([str(tmp_path), "--size", "big"])


def test_cli_watch_follows_until_stop(tmp_path, capsys):
    _synthetic(tmp_path / "memory.jsonl")  # already finished: --watch reads it and draws
    assert memmap.main([str(tmp_path), "--watch", "--interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "[memory] t=0.9s | backward @ step 2" in out and "memory peaks" in out


def test_no_samples_is_an_error(tmp_path):
    _write(tmp_path / "memory.jsonl", [{"type": "start", "time": 0}])
    with pytest.raises(ValueError, match="no samples to draw"):
        render(load(tmp_path))


# Reading a record needs neither rich nor matplotlib; the command says so in one line when they are missing.
WITHOUT_THE_MONITOR_EXTRA = """
import runpy, sys, warnings
for name in ("rich", "matplotlib"):
    sys.modules[name] = None          # import of either now fails, as if not installed
if sys.argv[1] == "parse":
    from forge_rt.monitor.replay import RecordFollower, load, summary
    from forge_rt.monitor import MemoryMonitor, watch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record = load(sys.argv[2])
    follower = RecordFollower(sys.argv[2])
    follower.poll()
    peaks = {r["pool"]: r["peak"] for r in summary(record)}
    print(len(record.samples), len(record.marks), peaks["rss"], follower.finished, follower.view.peaks()["rss"])
else:
    sys.argv = ["forge_rt.memmap", *sys.argv[2:]]
    runpy.run_module("forge_rt.memmap", run_name="__main__")
"""


def _without_extra(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", WITHOUT_THE_MONITOR_EXTRA, *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_record_parses_without_rich_or_matplotlib(tmp_path):
    recs = _synthetic(tmp_path / "memory.jsonl")
    out = _without_extra("parse", tmp_path)
    assert out.returncode == 0, out.stderr
    n_samples = sum(r["type"] == "sample" for r in recs)
    assert out.stdout.split() == [str(n_samples), "4", str(640 * MIB), "True", str(640 * MIB)]


def test_memmap_command_without_the_monitor_extra(tmp_path):
    _synthetic(tmp_path / "memory.jsonl")
    out = _without_extra("cli", "--help")
    assert out.returncode == 0 and "usage" in out.stdout and "Traceback" not in out.stderr, out.stderr
    out = _without_extra("cli", tmp_path)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert err[0].startswith("error: ") and "pip install 'forge_rt[monitor]'" in err[0], out.stderr
    assert not (tmp_path / "memory.png").exists()
