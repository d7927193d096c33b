"""`python -m forge_rt.export` (forge_rt.cli.export)."""
import sys

from forge_rt.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
