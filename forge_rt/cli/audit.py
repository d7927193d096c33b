"""`python -m forge_rt.audit RUN`: measures again how much a run trained with --audit memorised its
canaries: each canary's exposure (its rank among random secrets of the same format) and whether greedy
decoding extracts it, under the base model and the tuned one. Prints the table and writes
RUN/audit/audit.json (and exposure.png); the trainer's --audit does the same at the end of a run."""
from __future__ import annotations

import argparse
from pathlib import Path

from forge_rt.cli.common import run_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m forge_rt.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory written by python -m forge_rt.train --audit")
    p.add_argument("--candidates", type=int, default=1000,
                   help="random secrets each canary is ranked against (exposure shows at most log2(N + 1) bits)")
    p.add_argument("--seed", type=int, default=None, help="candidate seed (default: the run's --seed)")
    p.add_argument("--passphrase-file", help="for a sealed run: read the passphrase from this file "
                                             "(else $FORGE_RT_PASSPHRASE or a prompt)")
    args = p.parse_args(argv)
    if args.candidates < 1:
        p.error("--candidates must be >= 1")

    def body():
        import json

        from forge_rt.models import load_run
        from forge_rt.privacy.audit import markdown
        from forge_rt.privacy.runaudit import audit_run, load_canaries
        run = Path(args.run)
        canaries = load_canaries(run)  # refused before the model loads when the run has none
        config = json.loads((run / "config.json").read_text())
        model, tok, _ = load_run(run, args.passphrase_file)
        seed = config.get("seed", 0) if args.seed is None else args.seed
        rec = audit_run(model, tok, canaries, run / "audit", args.candidates, seed, config.get("max_len", 4096))
        print(markdown(rec["table"], rec["models"]))
        print(f"audit: {run / 'audit' / 'audit.json'} ({rec['seconds']:.0f} s)")
    return run_command(body)
