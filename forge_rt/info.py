"""`python -m forge_rt.info`: what this install can run (backends, native build, extras) (forge_rt.cli.info)."""
import sys

from forge_rt.cli.info import main

if __name__ == "__main__":
    sys.exit(main())
