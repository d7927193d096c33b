"""The canary audit of a training run: the canaries a run inserts (kept in RUN/audit/canaries.json), and
their exposure and extraction under the base model (adapter disabled) and the tuned one, written to
RUN/audit/audit.json with a small plot. The trainer's --audit and `python -m forge_rt.audit RUN` both
end here."""
from __future__ import annotations

import json
import time
from pathlib import Path

from forge_rt.privacy.audit import audit, chat_encoder, markdown, summarize
from forge_rt.privacy.canary import Canary, insert_canaries, make_canaries
from forge_rt.privacy.errors import DPError

MODELS = ["base", "tuned"]
NOTE = ("this run trained on a copy of its data with the canaries inserted, so its adapter holds them: use it "
        "to measure memorisation, and train again without --audit for the adapter to keep")


def with_canaries(rows: list, seed: int) -> tuple[list, list[Canary]]:
    """The rows (chat `messages` examples) plus the run's canaries, shuffled in; and the canaries."""
    canaries = make_canaries(seed)
    return insert_canaries(rows, canaries, lambda c: {"messages": c.messages(), "line": None}, seed), canaries


def save_canaries(path: Path, canaries: list[Canary]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "canaries.json").write_text(json.dumps([c.to_dict() for c in canaries], indent=1) + "\n")


def load_canaries(run: Path) -> list[Canary]:
    path = Path(run) / "audit" / "canaries.json"
    if not path.is_file():
        raise DPError(f"{run}: no audit/canaries.json: the run was not trained with --audit, so there is no "
                      "canary to measure; train with --audit")
    return [Canary(**d) for d in json.loads(path.read_text())]


def audit_run(model, tokenizer, canaries: list[Canary], out: Path, n_candidates: int, seed: int,
              max_len: int = 4096) -> dict:
    """Exposure of every canary under the base (adapter disabled) and the tuned model; writes out/audit.json
    and out/exposure.png. Returns the record metrics.json keeps."""
    t0 = time.time()
    encode = chat_encoder(tokenizer, max_len)
    with model.disable_adapter():
        base = audit(model, tokenizer, canaries, encode, n_candidates, seed)
    tuned = audit(model, tokenizer, canaries, encode, n_candidates, seed)
    table = summarize({"base": base, "tuned": tuned})
    rec = {"canaries": len(canaries), "candidates": n_candidates + 1, "table": table, "models": MODELS,
           "note": NOTE, "seconds": round(time.time() - t0, 1), "plot": None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps({**rec, "base": base, "tuned": tuned}, indent=1) + "\n")
    rec["plot"] = plot(table, out / "exposure.png")
    return rec


def plot(table: list[dict], path: Path) -> str | None:
    """Exposure against repetitions, one line per format and model; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for fmt in dict.fromkeys(c["format"] for c in table):
        cells = [c for c in table if c["format"] == fmt]
        reps = [c["repeats"] for c in cells]
        line, = ax.plot(reps, [c["tuned_exposure"] for c in cells], marker="o", label=f"{fmt} tuned")
        ax.plot(reps, [c["base_exposure"] for c in cells], ls=":", color=line.get_color(), label=f"{fmt} base")
    ax.axhline(table[0]["max_exposure"], color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="repetitions in the training data", ylabel="exposure (bits)",
           title="Canary exposure")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def report_lines(m: dict) -> list[str]:
    """report.md's sections on differential privacy and the canary audit (empty when neither ran)."""
    lines = []
    dp = m.get("dp")
    if dp:
        target = "" if dp["epsilon_target"] is None else f" (target {dp['epsilon_target']:g})"
        lines += ["", "## Differential privacy", "",
                  f"- ({dp['epsilon_spent']:.3g}, {dp['delta']:g})-DP for each training example{target}, by Opacus' "
                  f"{dp['accountant'].upper()} accountant over {dp['steps']} steps",
                  f"- per-example clipping of the LoRA gradients to {dp['clip']:g}; Gaussian noise multiplier "
                  f"{dp['noise_multiplier']:.4g}; Poisson sampling at rate {dp['sample_rate']:.4g} (expected batch "
                  f"{dp['expected_batch']}); {100 * dp['clipped_fraction']:.0f}% of {dp['examples_seen']} sampled "
                  f"examples were clipped; per-example work {dp['per_example_seconds']:.1f} s of the training time"]
    a = m.get("audit")
    if a:
        lines += ["", "## Canary audit (memorisation)", "",
                  f"{a['canaries']} canaries, each ranked among {a['candidates']} secrets of its format (exposure "
                  f"at most {a['table'][0]['max_exposure']:.1f} bits; about 1.4 for a secret the model never saw). "
                  f"Note: {a['note']}.", "", markdown(a["table"], a["models"])]
        if a.get("plot"):
            lines += ["", f"![exposure]({Path(a['plot']).parent.name}/{Path(a['plot']).name})"]
    return lines
