"""`python -m forge_rt.memmap RUN_DIR`: the MemoryMap replay command (forge_rt.monitor.replay)."""
import sys

from forge_rt.monitor.replay import main

if __name__ == "__main__":
    sys.exit(main())
