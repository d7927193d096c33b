"""MemoryMap sampler, sources, live panel and the HF Trainer callback."""
import io
import json
import os
import resource
import time

import numpy as np
import pytest
from rich.console import Console

from forge_rt.monitor.sources import parse_tegrastats
from forge_rt.monitor import LivePanel, MemoryMonitor, live, watch

MIB = 1 << 20


def _records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _wait_for(monitor, pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = monitor.latest()
        if s is not None and pred(s):
            return s
        time.sleep(0.01)
    raise AssertionError(f"condition not seen in samples within {timeout} s; last {monitor.latest()}")


def _vmrss():
    # Independent of the monitor's statm reading: the kernel's status file.
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))


def test_sampler_sees_known_allocation(tmp_path):
    with watch(tmp_path, interval=0.02) as mon:
        base = _wait_for(mon, lambda s: True)["rss"]
        mon.mark("alloc")
        block = np.empty(512 * MIB, dtype=np.uint8)
        block.fill(7)  # touch every page so it is resident
        held = _vmrss()
        seen = _wait_for(mon, lambda s: s["rss"] >= base + 500 * MIB)
        mon.mark("free")
        del block
        _wait_for(mon, lambda s: s["rss"] < seen["rss"] - 400 * MIB)
    assert held >= base + 500 * MIB
    recs = _records(tmp_path / "memory.jsonl")
    marks = {r["phase"]: r["t"] for r in recs if r["type"] == "mark"}
    samples = [r for r in recs if r["type"] == "sample"]
    during = [s["rss"] for s in samples if marks["alloc"] <= s["t"] <= marks["free"]]
    after = [s["rss"] for s in samples if s["t"] > marks["free"]]
    assert max(during) - base >= 500 * MIB
    assert abs(max(during) - held) < 64 * MIB
    assert min(after) < max(during) - 400 * MIB
    # VmHWM in the record vs the kernel's own maximum for the process (getrusage, in KiB).
    assert samples[-1]["rss_peak"] >= base + 500 * MIB  # not 512: other pages may leave RSS meanwhile
    assert abs(samples[-1]["rss_peak"] - resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) < 8 * MIB


def test_events_in_order_and_each_preceded_by_a_sample(tmp_path):
    plan = [("forward", 1), ("backward", 1), ("optimizer", 1), ("forward", 2), ("backward", 2),
            ("optimizer", 2), ("eval", 2), ("checkpoint", 2), ("idle", None)]
    with watch(tmp_path / "run.jsonl", interval=0.005) as mon:
        for phase, step in plan:
            mon.mark(phase, step)
            time.sleep(0.01)
    recs = _records(tmp_path / "run.jsonl")
    assert recs[0]["type"] == "start" and recs[-1]["type"] == "stop"
    assert [(r["phase"], r["step"]) for r in recs if r["type"] == "mark"] == plan
    times = [r["t"] for r in recs[1:]]
    assert times == sorted(times)
    for i, r in enumerate(recs):
        if r["type"] == "mark":
            assert recs[i - 1]["type"] == "sample"
    assert mon.view.phase == "idle"


class _Pager:
    def __init__(self):
        self.raw, self.comp, self.spill = 0, 0, 0

    def stats(self):
        return {"bytes_raw": self.raw, "bytes_compressed": self.comp, "bytes_spilled": self.spill,
                "ratio": self.raw / max(1, self.comp + self.spill), "n_chunks": 3}


def test_paging_tiers_are_sampled(tmp_path):
    pager = _Pager()
    with watch(tmp_path, interval=0.01, paging=pager) as mon:
        pager.raw, pager.comp, pager.spill = 300 * MIB, 100 * MIB, 50 * MIB
        s = _wait_for(mon, lambda s: s.get("page_raw") == 300 * MIB)
    assert (s["page_compressed"], s["page_spilled"], s["page_ratio"]) == (100 * MIB, 50 * MIB, 2.0)
    assert mon.sources["paging"] == "ok"
    assert mon.peaks()["page_raw"] == 300 * MIB


def test_pager_current_values_not_running_totals(tmp_path):
    class Totals:  # forge_rt Pager layout: running totals next to what is held now
        budget_bytes = 8 * MIB

        def stats(self):
            return {"bytes_raw": 900 * MIB, "bytes_compressed": 450 * MIB, "bytes_spilled": 70 * MIB,
                    "ratio": 2.0, "resident_bytes": 3 * MIB, "spilled_now_bytes": 1 * MIB}

    with watch(tmp_path, interval=0.01, paging=Totals()) as mon:
        s = _wait_for(mon, lambda s: True)
    assert (s["page_compressed"], s["page_spilled"], s["page_ratio"]) == (3 * MIB, 1 * MIB, 2.0)
    assert "page_raw" not in s  # no current raw size reported: none invented from the totals
    assert mon.view.header["paging_budget"] == 8 * MIB


def test_real_pager_pools_rise_and_fall(tmp_path):
    import torch

    import forge_rt

    torch.manual_seed(0)
    x = torch.randn(512, 1024, requires_grad=True)
    with forge_rt.paging() as pager, watch(tmp_path, interval=0.01, paging=pager) as mon:
        y = x
        for _ in range(4):
            y = torch.relu(y * 1.5 + 0.25)  # each saves a 2 MiB fp32 tensor for backward
        held = pager.stats()["resident_bytes"]
        during = _wait_for(mon, lambda s: s.get("page_compressed") == held)
        y.sum().backward()
        del y
        after = _wait_for(mon, lambda s: s.get("page_compressed") == 0)
    assert mon.sources["paging"] == "ok"
    assert held > 0 and during["page_spilled"] == after["page_spilled"] == 0
    assert during["t"] < after["t"]


def test_missing_sources_reported_not_fatal(tmp_path, monkeypatch):
    import torch

    class Broken:
        def stats(self):
            raise OSError("pool gone")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no tegrastats anywhere
    with watch(tmp_path, interval=0.01, paging=Broken()) as mon:
        _wait_for(mon, lambda s: s["t"] > 0.05)
    assert mon.sources["cuda"].startswith("missing: torch.cuda.is_available() is False")
    assert mon.sources["tegrastats"].startswith("missing: tegrastats not on PATH")
    assert mon.sources["paging"] == "failed: OSError: pool gone"
    assert mon.sources["proc"] == "ok"
    assert set(mon.missing()) == {"cuda", "tegrastats", "paging"}
    recs = _records(tmp_path / "memory.jsonl")
    assert recs[0]["sources"]["cuda"].startswith("missing")
    assert recs[-1]["sources"]["paging"].startswith("failed")
    assert sum(r["type"] == "sample" for r in recs) >= 3

    text = io.StringIO()
    Console(file=text, width=200).print(LivePanel(mon))
    assert "not sampled: cuda (torch.cuda.is_available() is False" in text.getvalue()


def test_no_paging_object_is_reported():
    mon = MemoryMonitor(tegrastats=False).start()
    mon.stop()
    assert mon.sources["paging"] == "missing: no paging object given"
    assert "tegrastats" not in mon.sources


def test_tegrastats_parser():
    # Layout documented for Jetson AGX Orin (JetPack 5/6), with and without the leading timestamp.
    line = ("RAM 5071/30536MB (lfb 5281x4MB) SWAP 12/15268MB (cached 0MB) CPU [1%@729,0%@729,off,off] "
            "EMC_FREQ 0%@2133 GR3D_FREQ 37%@[305,305] VIC_FREQ 729 APE 174 CPU@46.031C VDD_GPU_SOC 2790mW/2790mW")
    want = {"tegra_ram_used": 5071 * MIB, "tegra_ram_total": 30536 * MIB, "tegra_swap_used": 12 * MIB,
            "tegra_swap_total": 15268 * MIB, "tegra_gpu_load": 37}
    assert parse_tegrastats(line) == want
    assert parse_tegrastats("11-22-2026 03:59:26 " + line) == want
    assert parse_tegrastats("RAM 100/200MB (lfb 1x4MB) CPU [5%@102]") == {"tegra_ram_used": 100 * MIB,
                                                                          "tegra_ram_total": 200 * MIB}
    assert parse_tegrastats("") == {} and parse_tegrastats("tegrastats: permission denied") == {}


def test_tegrastats_source_runs_the_binary(tmp_path, monkeypatch):
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\nwhile true; do echo 'RAM 2048/8192MB (lfb 5x4MB) SWAP 0/4096MB GR3D_FREQ 5%'; "
                    "sleep 0.02; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with watch(tmp_path / "m.jsonl", interval=0.01) as mon:
        s = _wait_for(mon, lambda s: "tegra_ram_used" in s)
    assert mon.sources["tegrastats"] == "ok"
    assert (s["tegra_ram_used"], s["tegra_ram_total"], s["tegra_gpu_load"]) == (2048 * MIB, 8192 * MIB, 5)


def test_live_panel_plain_when_not_a_terminal(tmp_path):
    pager = _Pager()
    pager.raw, pager.comp = 64 * MIB, 32 * MIB
    mon = MemoryMonitor(interval=0.01, paging=pager, budget_bytes=1 << 40, warn_available=1 << 60).start()
    try:
        _wait_for(mon, lambda s: s["t"] > 0.05)
        mon.mark("backward", 4)
        out = io.StringIO()
        console = Console(file=out, width=120)
        assert not console.is_terminal
        console.print(LivePanel(mon))
        with live(mon, console=console, plain_interval=0.02):
            time.sleep(0.1)
        text = out.getvalue()
        assert "\x1b" not in text
        assert "process RSS" in text and "paging ratio 2.00x" in text and "backward @ step 4" in text
        assert "headroom to budget 1024.0 GiB" in text and "WARNING" in text
        plain = [l for l in text.splitlines() if l.startswith("[memory] t=")]
        assert len(plain) >= 2  # periodic lines plus the final one

        # The same panel on a terminal does use escape codes: the check above can fail.
        tty = io.StringIO()
        Console(file=tty, width=120, force_terminal=True, color_system="standard").print(LivePanel(mon))
        assert "\x1b[" in tty.getvalue()
    finally:
        mon.stop()


def test_misuse_is_reported_clearly(tmp_path):
    with pytest.raises(ValueError, match="interval must be > 0"):
        MemoryMonitor(interval=0)
    mon = MemoryMonitor()
    with pytest.raises(RuntimeError, match="before start"):
        mon.mark("forward", 1)
    with mon:
        with pytest.raises(ValueError, match="phase must be a non-empty string"):
            mon.mark("", 1)
        with pytest.raises(RuntimeError, match="already running"):
            mon.start()
    mon.mark("forward", 2)  # after stop: ignored, no error
    assert mon.out_path is None


def test_hf_trainer_callback_marks_phases(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from forge_rt.monitor import ForgeMemoryCallback

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    ids = torch.randint(0, 64, (8, 16))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                             logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    callback = ForgeMemoryCallback(interval=0.01)
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4], callbacks=[callback]).train()
    recs = _records(tmp_path / "memory.jsonl")
    assert recs[-1]["type"] == "stop"
    marks = [(r["phase"], r["step"]) for r in recs if r["type"] == "mark"]
    assert marks == [("forward", 1), ("backward", 1), ("optimizer", 1), ("idle", 1),
                     ("forward", 2), ("backward", 2), ("optimizer", 2), ("eval", 2), ("checkpoint", 2), ("idle", 2)]
    assert model._forward_hooks == {} and model._forward_pre_hooks == {}
