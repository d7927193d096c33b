"""`python -m forge_rt.evaluate`: the held-out score of an exported GGUF, measured in llama.cpp (forge_rt.cli.evaluate)."""
import sys

from forge_rt.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
