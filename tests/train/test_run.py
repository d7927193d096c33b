"""Trainer end to end on a tiny random Llama: run directory, metrics, resume, signals, offline."""
from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import torch

from forge_rt.cli import train
from forge_rt.testing import sigint_at_optimizer_step, tiny_args, tiny_rows, write_jsonl


def _records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _block_outbound(monkeypatch) -> list:
    """Records (and refuses) any connect() to a non-loopback address; returns the record."""
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError("outbound connection blocked by test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def test_default_path_writes_complete_run_dir_offline(tiny, tmp_path, monkeypatch):
    model_dir, data = tiny
    attempts = _block_outbound(monkeypatch)
    from forge_rt.train import memory
    caps, real_cap = [], memory.cap_rss
    monkeypatch.setattr(memory, "cap_rss", lambda *a: caps.append(real_cap(*a)) or caps[-1])
    evals = write_jsonl(tmp_path / "eval.jsonl", tiny_rows(4))
    run = tmp_path / "run"
    args = tiny_args(model_dir, data, run, "--max-len", "56", "--eval-data", str(evals), "--max-new-tokens", "4",
                     "--paging-budget", "1M",  # a small budget sends paged activations to the disk tier
                     # no recomputation and rows wide enough that saved tensors pass the pager's 256 KiB minimum
                     "--memory", "speed", "--batch-size", "12")
    args.remove("--no-eval")
    assert train.main(args) == 0
    for name in ("config.json", "metrics.jsonl", "metrics.json", "report.md", "loss.png", "memory.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]  # the newest two
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(r["tokens_per_s"] > 0 and r["rss_bytes"] > 0 and r["lr"] >= 0 for r in recs)
    assert recs[0]["paging"]["bytes_raw"] > 0 and sum(r["paging"]["bytes_spilled"] for r in recs) > 0
    m = json.loads((run / "metrics.json").read_text())
    for key in ("score_base", "score_tuned", "ppl_retention_base", "ppl_retention_tuned"):
        assert isinstance(m[key], float | int), key
    assert m["fused"] is True and m["steps"] == 6
    plan = m["memory_plan"]  # the planner's choice, its prediction beside the measured peak, the RSS cap's work
    assert plan["mode"] == "speed" and plan["measured_peak"] == m["peak_rss_bytes_train"]
    assert (plan["heap_trims"], plan["rss_cap"]) == (caps[0].trims, caps[0].cap)  # the trainer's own RssCap
    assert plan["rss_cap"] >= 1.05 * plan["predicted_peak"] - 1
    assert m["data"]["format"] == "prompt_completion" and m["data"]["n_truncated"] > 0  # max_len 56 truncates
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["max_len"] == 56 and cfg["lora_r"] == 4 and cfg["model"] == str(model_dir)
    assert "| score |" in (run / "report.md").read_text()
    # Offline: nothing tried to reach the network, and the hub libraries were set offline.
    assert attempts == [] and os.environ["HF_HUB_OFFLINE"] == "1"
    assert m["egress_attempts"] == 0  # the offline guard counts blocked attempts
    # The adapter's LoRA B matrices moved away from their zero init.
    from safetensors.torch import load_file
    w = load_file(run / "adapter/adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in w.items())


def test_interrupt_and_resume_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    model_dir, data = tiny
    flags = ("--lora-dropout", "0.1")  # dropout draws from the RNG that the checkpoint must restore
    full = tmp_path / "full"
    assert train.main(tiny_args(model_dir, data, full, *flags)) == 0

    # A real SIGINT delivered during optimizer step 3 (of 6): the trainer finishes the step,
    # checkpoints and exits cleanly.
    handler_before = signal.getsignal(signal.SIGINT)
    real_step = torch.optim.AdamW.step
    sigint_at_optimizer_step(monkeypatch, 3)
    part = tmp_path / "part"
    assert train.main(tiny_args(model_dir, data, part, *flags)) == 128 + signal.SIGINT
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert not (part / "adapter").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored

    assert train.main(["--resume", str(part), "--no-live"]) == 0
    a, b = _records(full), _records(part)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 7))
    assert abs(b[-1]["loss"] - a[-1]["loss"]) <= 0.02 * abs(a[-1]["loss"])
    # Same optimizer trajectory: restored optimizer/scheduler/RNG/data order give the same losses.
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    torch.testing.assert_close([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-4, atol=1e-5)


def test_seal_shred_and_scrub(tiny, tmp_path, monkeypatch, capsys):
    model_dir, _ = tiny
    rows = tiny_rows()
    rows[0]["prompt"] += " Reported by ops.lead@example.com"
    data = write_jsonl(tmp_path / "private.jsonl", rows)
    run = tmp_path / "run"
    monkeypatch.setenv("FORGE_RT_PASSPHRASE", "correct horse battery staple")
    assert train.main(tiny_args(model_dir, data, run, "--max-steps", "2", "--seal", "--shred-data",
                                 "--pack", "--grad-checkpointing")) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["scrub"]["counts"] == {"EMAIL": 1} and m["scrub"]["rows_touched"] == 1
    assert "example.com" not in (run / "metrics.json").read_text()
    assert (run / "adapter.sealed").is_file() and not (run / "adapter").exists() and not (run / "checkpoints").exists()
    assert not data.exists() and m["shredded"]["files"] == 1
    from forge_rt.cli import generate
    model, tok, _ = generate.load_run(run)  # decrypts in memory with FORGE_RT_PASSPHRASE
    assert model.forge_rt_summary["accelerated"] > 0
    monkeypatch.setenv("FORGE_RT_PASSPHRASE", "wrong")
    from forge_rt.sovereign.seal import WrongPassphraseError
    with pytest.raises(WrongPassphraseError):
        generate.load_run(run)


@pytest.mark.slow
def test_export_at_the_end_scores_each_gguf_in_llamacpp(tiny, tmp_path):
    """--export writes every kind under RUN/export/ and scores what will be deployed in llama.cpp: the merged
    GGUF alone, the adapter over the gguf-base of the same run; report.md lists sizes and scores."""
    pytest.importorskip("xllamacpp")
    model_dir, data = tiny
    evals = write_jsonl(tmp_path / "eval.jsonl", tiny_rows(3))
    run = tmp_path / "run"
    args = tiny_args(model_dir, data, run, "--max-steps", "2", "--eval-data", str(evals), "--max-new-tokens", "4",
                     "--export", "gguf,gguf-lora,gguf-base,hf")
    args.remove("--no-eval")
    assert train.main(args) == 0
    exports = {e["kind"]: e for e in json.loads((run / "metrics.json").read_text())["exports"]}
    assert set(exports) == {"gguf", "gguf-lora", "gguf-base", "hf"}
    for kind, name in (("gguf", "model-f16.gguf"), ("gguf-lora", "adapter-f16.gguf"), ("gguf-base", "base-f16.gguf")):
        assert exports[kind]["output"] == str(run / "export" / name) and (run / "export" / name).is_file()
    assert exports["gguf"]["llamacpp"]["n"] == 3 and exports["gguf"]["llamacpp"]["model"].endswith("model-f16.gguf")
    assert exports["gguf-lora"]["llamacpp"]["model"] == str(run / "export" / "base-f16.gguf")
    assert "llamacpp" not in exports["gguf-base"] and "llamacpp" not in exports["hf"]
    report = (run / "report.md").read_text()
    assert report.count("in llama.cpp") == 2 and "over `" in report and "MiB" in report
    # The scoring pairs each export with its base: scored against references equal to what llama.cpp itself
    # answers with that pair (asked here directly), each gives 100; the recorded scores are those answers'.
    from forge_rt.data import load_examples
    from forge_rt.eval.llamacpp import LlamaCppEngine
    from forge_rt.eval.score import score_examples
    from forge_rt.train import deliver
    rows = list(load_examples(evals))
    pairs = {"gguf": (run / "export" / "model-f16.gguf", None),
             "gguf-lora": (run / "export" / "base-f16.gguf", run / "export" / "adapter-f16.gguf")}
    for kind, (model, lora) in pairs.items():
        answers = LlamaCppEngine(model, lora, n_ctx=512, threads=1).answers([r["messages"][:-1] for r in rows], 4)
        assert exports[kind]["llamacpp"]["score"] == score_examples(rows, answers)["score"], kind
        own = [{**r, "messages": [*r["messages"][:-1], {"role": "assistant", "content": a}]} for r, a in zip(rows, answers)]
        recs = [dict(exports[k], llamacpp=None) for k in ((kind,) if kind == "gguf" else (kind, "gguf-base"))]
        deliver._score_exports(recs, own, 4)
        assert recs[0]["llamacpp"]["score"] == 100 and recs[0]["llamacpp"]["n"] == 3, (kind, answers)


@pytest.mark.slow
def test_export_gguf_lora_over_a_hf_base_needs_gguf_base(tiny, tmp_path):
    pytest.importorskip("xllamacpp")
    model_dir, data = tiny
    run = tmp_path / "run"
    args = tiny_args(model_dir, data, run, "--max-steps", "1", "--eval-data", str(write_jsonl(tmp_path / "e.jsonl", tiny_rows(2))),
                     "--max-new-tokens", "2", "--export", "gguf-lora")
    args.remove("--no-eval")
    assert train.main(args) == 0
    lora, = json.loads((run / "metrics.json").read_text())["exports"]
    assert "gguf-base" in lora["llamacpp"]["skipped"]
    assert "not scored in llama.cpp (no base GGUF: add gguf-base to --export)" in (run / "report.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "qwen2", "gpt_neox"])
def test_rss_cap_watches_every_decoder_layer(arch):
    """The cap hooks the layers transformers checkpoints, whatever each architecture names its layer class
    (GPT-NeoX's is GPTNeoXLayer: a class-name filter on ...DecoderLayer missed it)."""
    from types import SimpleNamespace
    from transformers import AutoConfig, AutoModelForCausalLM
    from forge_rt.train.memory import cap_rss as _cap_rss
    cfg = AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    _cap_rss(model, SimpleNamespace(predicted_peak=1 << 40))
    hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert len(hooked) == 3 and all(n.endswith(("layers.0", "layers.1", "layers.2")) for n in hooked)
