"""Edge export: fold a trained LoRA adapter into the base (`merge`) and write it for deployment
(`export_run`): a merged Hugging Face directory, one merged GGUF for llama.cpp, or a llama.cpp LoRA
GGUF over the unchanged base GGUF. `python -m forge_rt.export --help`."""
from .api import export_run
from .merge import MergeError, merge
from .source import ExportError

__all__ = ["export_run", "merge", "ExportError", "MergeError"]
