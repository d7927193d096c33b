"""The run's record: metrics.json (numbers), report.md (before/after table) and PNG plots of loss and
memory over the training steps."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from forge_rt.core.atomic import write_atomic

EVAL_KEYS = ("score", "exact", "field_acc", "valid_json", "ppl_retention")


def build_metrics(cfg, train: dict, base: dict | None, tuned: dict | None, *, data: dict, scrub: dict,
                  paging: dict | None, fused_summary, eval_time_s: float, total_time_s: float) -> dict:
    steps = train["step_times"]
    m = {
        "steps": train["steps"],
        "total_steps": train["total_steps"],
        "train_time_s": round(train["train_time_s"], 2),
        "eval_time_s": round(eval_time_s, 2),
        "total_time_s": round(total_time_s, 2),
        "step_time_mean_s": (sum(steps) / len(steps)) if steps else None,
        "tokens_per_s_mean": train["tokens_per_s_mean"],
        "peak_rss_bytes_train": train["peak_rss_bytes"],
        "pre_step_rss_bytes": train.get("pre_step_rss_bytes"),
        "fused": not cfg.no_fused,
        "paging": None if cfg.no_paging else paging,
        "fused_summary": dict(fused_summary) if fused_summary else None,
        "data": data,
        "scrub": scrub,
        "dp": train.get("dp"),
        "config": dataclasses.asdict(cfg),
    }
    for key in EVAL_KEYS:
        m[f"{key}_base"] = base.get(key) if base else None
        m[f"{key}_tuned"] = tuned.get(key) if tuned else None
    if base and tuned:
        m["score_gain"] = _diff(tuned.get("score"), base.get("score"))
        pb, pt = base.get("ppl_retention"), tuned.get("ppl_retention")
        m["ppl_retention_change_pct"] = 100.0 * (pt - pb) / pb if pb and pt is not None else None
        m["retention_ok"] = m["ppl_retention_change_pct"] is not None and m["ppl_retention_change_pct"] <= 10.0
    m["samples_tuned"] = (tuned or {}).get("samples", [])[:5]
    return m


def _diff(a, b):
    return None if a is None or b is None else a - b


def summary_line(m: dict) -> str:
    parts = [f"steps {m['steps']}", f"train {m['train_time_s']:.0f}s", f"eval {m['eval_time_s']:.0f}s"]
    if m.get("score_base") is not None:
        parts.append(f"score {m['score_base']:.1f} -> {m['score_tuned']:.1f}")
        parts.append(f"retention ppl {m['ppl_retention_base']:.2f} -> {m['ppl_retention_tuned']:.2f}")
    return "done: " + ", ".join(parts)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def plot(records: list[dict], run: Path) -> list[str]:
    """loss.png over the training steps (memory over time is the MemoryMap's memory.png); returns the file names written."""
    if not records:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=110)
    plt.close(fig)

    return ["loss.png"]


def plot_memory_map(run: Path) -> list[str]:
    """memory.png from the monitor's 10 Hz record (pools over time, phases shaded, peaks annotated); under
    torchrun also memory.rank<R>.png from each other rank's record found here (same machine)."""
    from forge_rt.monitor import replay
    from forge_rt.monitor.ui import plot
    records = sorted(run.glob("memory.rank*.jsonl"), key=lambda p: int(p.name[len("memory.rank"):-len(".jsonl")]))
    names = []
    for record in [run / "memory.jsonl", *records]:
        if record.exists():
            plot.render(replay.load(record), out=record.with_suffix(".png"))
            names.append(record.with_suffix(".png").name)
    return names


GAP_WARN_POINTS = 3.0  # an export scoring further than this from PyTorch does not reproduce the trained model


def render_markdown(m: dict, plots: list[str]) -> str:
    lines = ["# forge_rt training report", ""]
    d = m["data"]
    pf = d.get("prompt_format") or {}
    lines += [f"- data: {d['n_train']} training examples ({d['format']} format) from `{d['path']}`; "
              f"{d['n_truncated']} truncated to max_len {m['config']['max_len']}; {d['n_eval']} held-out",
              f"- prompt format: {pf.get('name', '-')} ({pf.get('reason', '-')})",
              f"- path: {'forge_rt NF4 + fused LoRA kernels' if m['fused'] else 'stock PEFT LoRA, full precision'}; "
              f"paging {'off' if m['paging'] is None else 'on'}",
              f"- steps: {m['steps']} in {m['train_time_s']:.0f} s "
              f"({_fmt(m['step_time_mean_s'])} s/step, {_fmt(m['tokens_per_s_mean'])} tokens/s); "
              f"evaluation {m['eval_time_s']:.0f} s; total {m['total_time_s']:.0f} s",
              f"- peak RSS while training: {m['peak_rss_bytes_train'] / 2**30:.2f} GiB"]
    if m.get("paging"):
        p = m["paging"]
        lines.append(f"- paging: {_fmt((p.get('bytes_raw') or 0) / 2**30)} GiB of saved activations paged, "
                     f"{_fmt(p.get('ratio'))}x compression, {_fmt((p.get('bytes_spilled') or 0) / 2**20)} MiB spilled to disk "
                     f"({p.get('codec', '')})")
    lines += _memory_plan_lines(m.get("memory_plan"), m.get("pre_step_rss_bytes"))
    if m.get("eval"):
        e = m["eval"]
        base = f"cached (`{e['base_cached_from']}`)" if e["base_cached"] else f"{_fmt(e['base_seconds'])} s"
        lines.append(f"- evaluation engine: {e['engine']}; base model {base}, tuned {_fmt(e['tuned_seconds'])} s")
    for e in m.get("exports") or []:
        lines.append(f"- export `{e.get('kind')}`: `{e.get('output')}` ({(e.get('bytes') or 0) / 2**20:.1f} MiB)"
                     + _llamacpp_score(e))
    s = m.get("scrub") or {}
    lines.append(f"- PII scrubbing: {json.dumps(s)}")
    if "egress_attempts" in m:
        lines.append(f"- network egress (offline guard): {m['egress']}; allowed: {m.get('egress_allowed', '-')}; "
                     f"network namespace (--isolate): {'on, only loopback' if m.get('isolated') else 'off'}")
    if m.get("distributed"):
        d = m["distributed"]
        lines.append(f"- data-parallel: {d['ranks']} ranks ({d['backend']}), rendezvous at {d['rendezvous']}; "
                     "global batch = --batch-size, shared out across the ranks")
    if m.get("sealed"):
        lines.append(f"- adapter sealed to `{m['sealed']['sealed']}` ({m['sealed']['kdf']}, AES-256-GCM); "
                     f"{m['sealed']['plaintext_shredded']} plaintext adapter/checkpoint files shredded")
    if m.get("shredded"):
        sh = m["shredded"]
        lines.append(f"- training data shredded: {sh['files']} file(s), {sh['bytes']} bytes at {sh['time']} "
                     f"(caveat: {sh['caveat']})")
    if m.get("score_base") is not None:
        lines += ["", "## Evaluation (held-out set, greedy decoding)", "",
                  "| metric | base | tuned |", "|---|---|---|"]
        for key in ("score", "exact", "field_acc", "valid_json", "ppl_retention"):
            lines.append(f"| {key} | {_fmt(m[f'{key}_base'])} | {_fmt(m[f'{key}_tuned'])} |")
        lines += ["", f"Score gain: {_fmt(m['score_gain'])} points. Retention perplexity change: "
                      f"{_fmt(m['ppl_retention_change_pct'])}% (guard: <= +10%, "
                      f"{'holds' if m['retention_ok'] else 'VIOLATED'})."]
    if m.get("dp") or m.get("audit"):
        from forge_rt.privacy.runaudit import report_lines
        lines += report_lines(m)
    for name in plots:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def _llamacpp_score(export: dict) -> str:
    s = export.get("llamacpp")
    if s is None:
        return ""
    if "score" not in s:
        return f"; not scored in llama.cpp ({s.get('skipped')})"
    over = f" over `{s['model']}`" if export.get("kind") == "gguf-lora" else ""
    warn = (f" **WARNING: {s['gap_vs_pytorch']:+.1f} points from the PyTorch score: this export does not reproduce "
            "the trained model**" if abs(s.get("gap_vs_pytorch") or 0) > GAP_WARN_POINTS else "")
    return (f"; in llama.cpp{over}: score {s['score']:.1f} (exact {_fmt(s['exact'])}, field {_fmt(s['field_acc'])}, "
            f"valid JSON {_fmt(s['valid_json'])}, n {s['n']}, {s['seconds']:.0f} s){warn}")


def _memory_plan_lines(plan: dict | None, pre: int | None) -> list[str]:
    if not plan:
        return []
    gib = 2 ** 30
    parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in plan["parts"].items())
    spill = "off" if plan["spill_budget"] is None else f"past {plan['spill_budget'] / 2**20:.0f} MiB"
    act = "" if pre is None else f" (activations {(plan['measured_peak'] - pre) / gib:.2f} GiB over the pre-step {pre / gib:.2f})"
    return [f"- memory plan `{plan['mode']}`: checkpointing {'on' if plan['checkpointing'] else 'off'}, chunked loss "
            f"{'on' if plan['chunked_loss'] else 'off'}, spill {spill}: {plan['reason']}",
            f"- memory: predicted peak {plan['predicted_peak'] / gib:.2f} GiB ({parts}); measured "
            f"{plan['measured_peak'] / gib:.2f} GiB{act}"]


def write_run_report(run: Path, metrics: dict, records: list[dict]) -> None:
    write_atomic(run / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n", mode=0o600)
    write_atomic(run / "report.md", render_markdown(metrics, plot(records, run) + plot_memory_map(run)), mode=0o600)
