"""`python -m forge_rt.train` (forge_rt.cli.train)."""
import sys

from forge_rt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
