"""`python -m forge_rt.train`: offline QLoRA from a dataset to an evaluated adapter.

Default: SmolLM2-135M-Instruct (shipped GGUF, fp32) -> forge_rt NF4 quantization -> PEFT LoRA on all
linear layers -> forge_rt fused kernels (`accelerate`) -> activation paging, trained on the shipped
telemetry-triage demo and evaluated before and after. See `--help` for bringing your own model/data."""
import sys

from forge_rt.train import main

if __name__ == "__main__":
    sys.exit(main())
