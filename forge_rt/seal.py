"""`python -m forge_rt.seal`: sealed adapters (forge_rt.cli.seal; the library is forge_rt.sovereign.seal)."""
import sys

from forge_rt.cli.seal import main

if __name__ == "__main__":
    sys.exit(main())
