"""`python -m forge_rt.evaluate --gguf FILE [--lora FILE]`: the held-out benchmark scored in llama.cpp, on
exactly what is deployed (forge_rt.export.evaluate_gguf). The PyTorch evaluation is forge_rt.train.evaluate."""
import sys

from forge_rt.export.evaluate_gguf import main

if __name__ == "__main__":
    sys.exit(main())
