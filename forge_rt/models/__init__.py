"""Models: where they come from (`paths`: checks before any long work), loading offline (`load`, and
`stream_load` straight into NF4), building the adapted model (`build`), and a finished run's directory
(`rundir`: its config, adapter, identity; `load_run` rebuilds its model)."""
from forge_rt.models.build import LoraSpec, TargetError, build_model, target_module_names
from forge_rt.models.load import load_model, load_tokenizer
from forge_rt.models.paths import ModelLoadError, check_model_path, default_gguf_path
from forge_rt.models.rundir import RunDir, RunDirError, load_run, run_identity

__all__ = ["LoraSpec", "TargetError", "build_model", "target_module_names", "load_model", "load_tokenizer", "ModelLoadError",
           "check_model_path", "default_gguf_path", "RunDir", "RunDirError", "load_run", "run_identity"]
