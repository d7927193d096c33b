"""python -m forge_rt.bench: run the benchmark suite and write its record (JSON + markdown table), compare two
records, or render the suite block of bench/results/NOTES.md from the newest committed records.

    python -m forge_rt.bench --suite quick                  # kernels, nf4, paging, step; < 3 min on 2 cores
    python -m forge_rt.bench --suite full --out bench/results
    python -m forge_rt.bench --only kernels,nf4 --device cuda
    python -m forge_rt.bench --compare A.json B.json        # ratios side by side, regressions flagged
    python -m forge_rt.bench --notes                        # bench/results/NOTES.md block <- suite-*.json
Benchmarks must run alone: another CPU-heavy process makes torch's OpenMP team spin and skews every figure.
Running the suite needs the `test` extra (pytest-benchmark); --compare and --notes need nothing more."""
from __future__ import annotations

import argparse
from pathlib import Path

from forge_rt.bench.cases import FAMILIES
from forge_rt.cli.common import run_command

ROOT = Path(__file__).resolve().parents[2]


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m forge_rt.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--suite", choices=("tiny", "quick", "full"), default="quick",
                   help="tiny: seconds, for tests; quick: minutes; full: the figures bench/results/NOTES.md quotes")
    p.add_argument("--only", help=f"comma-separated families of {','.join(FAMILIES)}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "jetson"), default="auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the record (suite-*.json/.md)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    p.add_argument("--noise", type=float, default=0.10, help="--compare: changes within this fraction are noise")
    p.add_argument("--notes", action="store_true", help="rewrite the generated block of --results/NOTES.md")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    return run_command(lambda: _run(args))


def _run(args) -> int:
    from forge_rt.bench import record
    if args.compare:
        table, bad = record.compare(record.load(args.compare[0]), record.load(args.compare[1]), args.noise)
        print(table)
        return 1 if bad else 0
    if args.notes:
        notes = args.results / "NOTES.md"
        changed = record.rewrite_notes(notes, args.results)
        print(f"{notes} block {'rewritten' if changed else 'already current'}")
        return 0
    from forge_rt.bench.suite import families, run_suite
    rec, errors = run_suite(args.suite, args.device, families(args.suite, args.only), args.threads)
    stem = f"suite-{rec['created'][:19].replace(':', '').replace('-', '')}-{rec['suite']}-{rec['device']}"
    path = record.save(rec, args.out / f"{stem}.json")
    table = record.markdown(rec)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"\nrecord: {path} ({rec['seconds']:.0f} s)")
    return 1 if errors else 0
