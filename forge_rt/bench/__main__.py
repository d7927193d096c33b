"""`python -m forge_rt.bench`: the benchmark suite's command line (forge_rt.cli.bench)."""
import sys

from forge_rt.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
