"""python -m forge_rt.bench: run the benchmark suite and write its record (JSON + markdown table), compare two
records, or render the README's performance block from the newest committed record.

    python -m forge_rt.bench --suite quick                  # kernels, nf4, paging, step; < 3 min on 2 cores
    python -m forge_rt.bench --suite full --out bench/results
    python -m forge_rt.bench --only kernels,nf4 --device cuda
    python -m forge_rt.bench --compare A.json B.json        # ratios side by side, regressions flagged
    python -m forge_rt.bench --readme                       # README block <- bench/results/suite-*.json
Benchmarks must run alone: another CPU-heavy process makes torch's OpenMP team spin and skews every figure."""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse(argv):
    from forge_rt.bench.cases import FAMILIES
    p = argparse.ArgumentParser(prog="python -m forge_rt.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--suite", choices=("tiny", "quick", "full"), default="quick",
                   help="tiny: seconds, for tests; quick: minutes; full: the figures the README quotes")
    p.add_argument("--only", help=f"comma-separated families of {','.join(FAMILIES)}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "jetson"), default="auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the record (suite-*.json/.md)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    p.add_argument("--noise", type=float, default=0.10, help="--compare: changes within this fraction are noise")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's generated block from --results")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def families(args) -> list[str]:
    from forge_rt.bench.cases import DEFAULT, FAMILIES
    if not args.only:
        return list(DEFAULT[args.suite])
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        raise SystemExit(f"--only: unknown families {', '.join(bad)} (choose from {', '.join(FAMILIES)})")
    return names


def run_suite(args) -> tuple[dict, int]:
    import torch

    from forge_rt.bench import env
    from forge_rt.bench.cases import Skip, family
    from forge_rt.bench.runner import Context, Progress
    if args.threads:
        torch.set_num_threads(args.threads)
    device = env.device_auto() if args.device == "auto" else args.device
    if device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device")
    names = families(args)
    mods = {n: family(n) for n in names}
    rec = {"schema": None, "suite": args.suite, "device": device, "argv": sys.argv[1:],
           "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "env": env.environment(), "loadavg": {"before": env.loadavg()}, "rows": [], "skipped": []}
    progress = Progress({n: m.ESTIMATE_S[args.suite] for n, m in mods.items()})
    errors, t0 = 0, time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forge_rt-bench-") as tmp:
        for name, mod in mods.items():
            ctx = Context(args.suite, device, Path(tmp), progress=progress)
            progress.start(name)
            try:
                rec["rows"] += mod.run(ctx)
            except Skip as why:
                rec["skipped"].append({"family": name, "why": str(why)})
            except Exception as exc:  # one broken family must not lose the others' figures
                traceback.print_exc()
                rec["skipped"].append({"family": name, "why": f"error: {type(exc).__name__}: {exc}"})
                errors += 1
            progress.end()
    from forge_rt.bench.record import SCHEMA
    rec.update(schema=SCHEMA, seconds=time.monotonic() - t0)
    rec["loadavg"]["after"] = env.loadavg()
    return rec, errors


def main(argv=None) -> int:
    args = parse(argv)
    from forge_rt.bench import record
    if args.compare:
        table, bad = record.compare(record.load(args.compare[0]), record.load(args.compare[1]), args.noise)
        print(table)
        return 1 if bad else 0
    if args.readme:
        changed = record.rewrite_readme(ROOT / "README.md", args.results)
        print(f"README.md block {'rewritten' if changed else 'already current'} from {args.results}")
        return 0
    rec, errors = run_suite(args)
    stem = f"suite-{rec['created'][:19].replace(':', '').replace('-', '')}-{rec['suite']}-{rec['device']}"
    path = record.save(rec, args.out / f"{stem}.json")
    table = record.markdown(rec)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"\nrecord: {path} ({rec['seconds']:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
