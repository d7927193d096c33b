"""Every forge_rt internal the export package uses, imported here only."""
from forge_rt.nf4 import NF4Weight, dequantize  # noqa: F401
from forge_rt.nn import NF4Linear, quantize_model  # noqa: F401
from forge_rt.sovereign import seal  # noqa: F401
from forge_rt.train.config import TrainConfig  # noqa: F401
from forge_rt.train.data import DataError, demo_paths, load_examples  # noqa: F401
from forge_rt.train.evaluate import score_predictions  # noqa: F401
from forge_rt.train.model import ModelLoadError, check_model_path, default_gguf_path, load_model, run_identity  # noqa: F401
from forge_rt.train.run import offline_guard  # noqa: F401
