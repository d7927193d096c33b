"""`python -m forge_rt.audit RUN`: canary exposure of a run trained with --audit (forge_rt.cli.audit)."""
import sys

from forge_rt.cli.audit import main

if __name__ == "__main__":
    sys.exit(main())
