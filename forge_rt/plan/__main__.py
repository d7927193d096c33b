"""`python -m forge_rt.plan` (forge_rt.cli.plan)."""
import sys

from forge_rt.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
