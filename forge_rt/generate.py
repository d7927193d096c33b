"""`python -m forge_rt.generate`: answer a prompt with a trained run's model (forge_rt.cli.generate)."""
import sys

from forge_rt.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
