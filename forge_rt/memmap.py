"""`python -m forge_rt.memmap RUN_DIR`: the MemoryMap replay command (forge_rt.cli.memmap)."""
import sys

from forge_rt.cli.memmap import main

if __name__ == "__main__":
    sys.exit(main())
