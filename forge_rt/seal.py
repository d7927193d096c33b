"""`python -m forge_rt.seal`: seal / unseal / verify adapters (forge_rt.sovereign.seal)."""
import sys

from forge_rt.sovereign.seal import main

if __name__ == "__main__":
    sys.exit(main())
