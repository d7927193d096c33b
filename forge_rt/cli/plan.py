"""`python -m forge_rt.plan`: will it fit? Predicted peak memory of each memory mode for a model, batch and
sequence length on a device class, from the model's config alone (no weights are loaded)."""
from __future__ import annotations

import argparse
from pathlib import Path

from forge_rt.cli.common import run_command
from forge_rt.plan.choose import MODES, plan
from forge_rt.plan.estimate import Shapes, parse_bytes

# Usable memory of each device class (total minus what the OS and, on Jetson, the display keep).
DEVICES = {"cpu": None, "cuda": None, "orin-16": 14 << 30, "orin-32": 29 << 30, "orin-64": 60 << 30}
PARTS = ("runtime", "tokenizer", "weights", "lora_adam", "activations", "logits", "workspace", "heap")


def load_shapes(model: str | None) -> Shapes:
    """The shapes from the model's config alone (a config is enough: no weights are read)."""
    from forge_rt.models.paths import check_model_path, default_gguf_path, model_config
    path = Path(model) if model else default_gguf_path()
    if path.is_file() and path.suffix != ".json":
        path = check_model_path(path)
    return Shapes.from_config(model_config(path))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m forge_rt.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF model directory, its config.json, or a .gguf file (default: the shipped model)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--labelled", type=float, default=1.0, help="share of tokens that carry a label (default 1)")
    p.add_argument("--budget", help="memory the run may use, e.g. 16G (default: the device class's)")
    p.add_argument("--device", choices=sorted(DEVICES), default="cpu")
    args = p.parse_args(argv)
    return run_command(lambda: _table(args))


def _table(args) -> None:
    shapes = load_shapes(args.model)
    budget = parse_bytes(args.budget) if args.budget else DEVICES[args.device]
    # Shapes alone give the memory; the step-time column uses this machine's probe (a GPU is faster).
    from forge_rt.plan.probe import probe
    rates = probe()
    print(f"{shapes.layers} layers, hidden {shapes.hidden}, vocab {shapes.vocab}; batch {args.batch_size} x "
          f"{args.seq_len} tokens, LoRA r={args.lora_r}, device {args.device}"
          + (f", budget {_gib(budget)} GiB" if budget else ""))
    print(f"{'mode':6s} {'peak GiB':>9s} " + " ".join(f"{k:>11s}" for k in PARTS) + "  fits  choice")
    for mode in MODES:
        pl = plan(shapes, args.batch_size, args.seq_len, mode, budget, rates=rates, labelled_fraction=args.labelled,
                  lora_r=args.lora_r, device="orin" if args.device.startswith("orin") else args.device)
        fits = "-" if budget is None else ("yes" if pl.predicted_peak <= budget else "NO")
        print(f"{mode:6s} {_gib(pl.predicted_peak):>9s} " + " ".join(f"{_gib(pl.parts[k]):>11s}" for k in PARTS)
              + f"  {fits:4s}  {pl.reason}")
