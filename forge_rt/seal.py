"""`python -m forge_rt.seal` and the `forge_rt.seal` name: sealed adapters, implemented in
forge_rt.sovereign.seal (this module re-exports its public names)."""
import sys

from forge_rt.sovereign.seal import *  # noqa: F401,F403
from forge_rt.sovereign.seal import main

if __name__ == "__main__":
    sys.exit(main())
