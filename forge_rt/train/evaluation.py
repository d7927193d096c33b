"""A run's held-out evaluation: the engine (--eval-engine), the GGUFs llama.cpp scores (the base as trained,
cached per base model file; this run's adapter), and the base model's result, cached per model, held-out
rows, prompt format, generation length, engine and retention text (eval.cache)."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from forge_rt.core.dist import Dist
from forge_rt.eval import cache
from forge_rt.eval.hf import evaluate as evaluate_pytorch
from forge_rt.models import default_gguf_path
from forge_rt.train.config import TrainConfig
from forge_rt.train.place import RunError

# The base as trained is exported at f16: the 4-bit values decoded and scaled round to f16 with a relative
# error of ~5e-4, far under what changes a greedy answer on the demo (bench/results/eval_speed.json), at half
# f32's bytes per decoded token. The adapter stays f32 (a few MiB).
BASE_QUANT, LORA_QUANT = "f16", "f32"


def _gguf_problem(model_path: Path) -> str | None:
    """Why this base cannot be scored in llama.cpp, or None."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return "xllamacpp is not installed (pip install 'forge_rt[export]')"
    if model_path.is_file():
        return None  # a GGUF in is a GGUF out
    from forge_rt.export.gguf_common import check_hf_arch
    from forge_rt.export.source import ExportError
    from forge_rt.models.paths import model_config
    try:
        check_hf_arch(model_config(model_path).model_type)
    except ExportError as exc:
        return str(exc).split(";")[0]
    return None


def choose_engine(requested: str, model_path: Path, dist: Dist) -> tuple[str, str | None]:
    """(engine, why PyTorch was chosen under auto or None). An explicit llamacpp that cannot run is an error."""
    if requested == "pytorch":
        return "pytorch", None
    problem = ("a data-parallel run shares generation out between ranks in PyTorch" if dist.enabled
               else _gguf_problem(model_path))
    if problem is None:
        return "llamacpp", None
    if requested == "llamacpp":
        raise RunError(f"--eval-engine llamacpp: {problem}; or use --eval-engine pytorch")
    return "pytorch", problem


class RunEval:
    """Scores the base (through the cache) and the tuned model of one run with the chosen engine."""

    def __init__(self, cfg: TrainConfig, inputs, dist: Dist):
        self.cfg, self.inputs, self.dist = cfg, inputs, dist
        self.model_path = Path(cfg.model) if cfg.model else default_gguf_path()
        self.engine, why = choose_engine(cfg.eval_engine, self.model_path, dist)
        self._model_digest = None
        if why:
            print(f"eval: in PyTorch, not llama.cpp: {why}", flush=True)

    def describe(self) -> str:
        return ("llama.cpp (xllamacpp) on the base as trained + this run's adapter, "
                f"{self.cfg.eval_batch_size} sequences at once" if self.engine == "llamacpp" else "PyTorch (HF generate)")

    def _digest(self) -> str:
        if self._model_digest is None:
            self._model_digest = cache.model_digest(self.model_path)
        return self._model_digest

    def base_cache(self, tok) -> cache.BaseScoreCache | None:
        if self.dist.enabled:  # every rank must take the same branch; the ranks' evaluation is shared out
            return None
        engine = ({"name": "llama.cpp", "base_quant": BASE_QUANT, "parallel": self.cfg.eval_batch_size}
                  if self.engine == "llamacpp" else {"name": "pytorch", "batch": self.cfg.eval_batch_size})
        template = getattr(tok, "chat_template", None) or ""
        return cache.BaseScoreCache({
            "model": self._digest(), "nf4": not self.cfg.no_fused, "data": cache.examples_digest(self.inputs.evals),
            "prompt_format": self.inputs.prompt.name if self.inputs.prompt else None,
            "chat_template": hashlib.sha256(template.encode()).hexdigest(),
            "max_new_tokens": self.cfg.max_new_tokens, "engine": engine,
            "retention": hashlib.sha256(self.inputs.retention.encode()).hexdigest()})

    def base(self, model, tok) -> dict:
        """The base model's result: from the cache when it holds this exact evaluation, else measured."""
        store = self.base_cache(tok)
        hit = store.get() if store is not None else None
        if hit is not None:
            print(f"eval: base model: cached ({hit['cached_from']})", flush=True)
            return {**hit, "seconds": 0.0}
        print("eval: base model ...", flush=True)
        res = self._evaluate(model, tok, adapter=False)
        if store is not None:
            store.put({k: v for k, v in res.items() if k != "cached"})
        return {**res, "cached": False}

    def tuned(self, model, tok) -> dict:
        print("eval: tuned model ...", flush=True)
        return self._evaluate(model, tok, adapter=True)

    def _evaluate(self, model, tok, adapter: bool) -> dict:
        cfg = self.cfg
        if self.engine == "pytorch":
            return evaluate_pytorch(model, tok, self.inputs.evals, self.inputs.retention, batch_size=cfg.eval_batch_size,
                                    max_new_tokens=cfg.max_new_tokens, dist=self.dist)
        from forge_rt.eval.engine import evaluate_llamacpp
        base, was_cached = self.base_gguf(model, tok)
        with tempfile.TemporaryDirectory(prefix="forge_rt-eval-") as tmp:
            lora = self.lora_gguf(model, Path(tmp)) if adapter else None
            res = evaluate_llamacpp(model, tok, self.inputs.evals, self.inputs.retention, base, lora,
                                    max_new_tokens=cfg.max_new_tokens, parallel=cfg.eval_batch_size)
        res.update(gguf_base_cached=was_cached, lora="this run's adapter (a temporary GGUF)" if adapter else None)
        return res

    def _source_gguf(self) -> Path | None:
        return self.model_path if self.model_path.is_file() else None

    def base_gguf(self, model, tok, quant: str = BASE_QUANT) -> tuple[Path, bool]:
        """The base as trained (adapter off, 4-bit weights decoded) as a GGUF, from the cache or written to it."""
        from forge_rt.export.gguf_model import write_gguf

        def produce(tmp: Path):
            print("eval: exporting the base as trained for llama.cpp (once per base model) ...", flush=True)
            # Streamed, the base decoded one layer at a time (a merged fp32 copy held 540 MiB more for SmolLM2-135M,
            # which stayed in the heap through training: pre-step RSS 1.25 GiB, metrics_20261207.json).
            write_gguf(model, tok, tmp, quant, self._source_gguf(), adapters=False)
        key = {"model": self._digest(), "nf4": not self.cfg.no_fused, "quant": quant}
        return cache.cached_file("gguf-base", key, ".gguf", produce)

    def lora_gguf(self, model, tmp: Path) -> Path:
        from forge_rt.export.gguf_lora import write_gguf_lora
        out = tmp / "adapter.gguf"
        write_gguf_lora(model, out, LORA_QUANT, self._source_gguf())
        return out


def eval_record(base: dict | None, tuned: dict | None) -> dict | None:
    """metrics.json's `eval`: the engine, each side's seconds, and whether the base result came from the cache."""
    if base is None and tuned is None:
        return None
    return {"engine": (tuned or base).get("engine", "pytorch"),
            "base_cached": bool(base and base.get("cached")), "base_cached_from": (base or {}).get("cached_from"),
            "base_seconds": (base or {}).get("seconds"), "tuned_seconds": (tuned or {}).get("seconds"),
            "gguf_base_cached": (tuned or base).get("gguf_base_cached")}
