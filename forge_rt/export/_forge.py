"""Every forge_rt internal the export package uses, imported here only (so a tree restructure re-points
these lines and nothing else)."""
from forge_rt import seal  # noqa: F401
from forge_rt.config import TrainConfig  # noqa: F401
from forge_rt.data import DataError, demo_paths, load_examples  # noqa: F401
from forge_rt.evaluate import score_predictions  # noqa: F401
from forge_rt.model_load import ModelLoadError, check_model_path, default_gguf_path, load_model  # noqa: F401
from forge_rt.nf4 import NF4Weight, dequantize  # noqa: F401
from forge_rt.swap import NF4Linear, quantize_model  # noqa: F401
from forge_rt.train import offline_guard  # noqa: F401
