"""`export_run`: a run (or adapter + base) to one or more of hf / gguf / gguf-lora, each with a manifest."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from forge_rt.core.atomic import OutputExistsError, atomic_path, check_target
from forge_rt.models.paths import model_config

from .manifest import build as build_manifest
from .manifest import write as write_manifest
from .gguf_common import FLOAT_TYPES, QUANTS, check_hf_arch, check_quant
from .imatrix import check_imatrix, read_imatrix_dat
from .kquant import config_row_lengths
from .gguf_lora import check_lora_quant, write_gguf_lora
from .gguf_model import write_gguf
from .hf import write_hf
from .merge import merge
from .source import ExportError, load, resolve

KINDS = ("gguf", "gguf-lora", "gguf-base", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_QUANT = {"gguf": "f16", "gguf-lora": "f16", "gguf-base": "f16"}


def _check(targets: dict, quant: str | None, dtype: str, overwrite: bool) -> None:
    if not targets:
        raise ExportError(f"nothing to export: give at least one of {', '.join(KINDS)} with an output path")
    for kind, out in targets.items():
        if kind not in KINDS:
            raise ExportError(f"unknown export kind {kind!r}; use one of {', '.join(KINDS)}")
        try:
            check_target(Path(out), overwrite)
        except (OutputExistsError, FileNotFoundError) as exc:
            raise ExportError(str(exc)) from None
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if quant is not None:
        for kind, check in (("gguf", check_quant), ("gguf-base", check_quant), ("gguf-lora", check_lora_quant)):
            if kind in targets:
                check(quant)


def _imatrix(path, quant: str | None, targets: dict, src) -> dict | None:
    """The imatrix file's weights, checked against the model before it is loaded."""
    if path is None:
        return None
    if not {"gguf", "gguf-base"} & set(targets) or quant is None or QUANTS[quant][0] in FLOAT_TYPES:
        raise ExportError("--imatrix weights a quantizer: give --to gguf or gguf-base with a quantized --quant "
                          "(e.g. q4_k_m)")
    imat = read_imatrix_dat(path)
    check_imatrix(imat, config_row_lengths(model_config(src.model)))
    return imat


def export_run(run=None, targets: dict | None = None, *, adapter=None, model=None, quant: str | None = None,
               dtype: str = "float32", overwrite: bool = False, passphrase_file=None, imatrix=None) -> list[dict]:
    """Export a trained adapter. `targets` maps kind ("gguf", "gguf-lora", "gguf-base", "hf") to an output path;
    gguf-base is the base exactly as training saw it (its 4-bit weights decoded), the base to run a gguf-lora
    adapter over.
    `run` is a run directory (its config names the base model); or give `adapter` (a PEFT directory or
    an adapter.sealed file) and `model` (HF directory or .gguf; default: the shipped SmolLM2 GGUF).
    `quant` is the GGUF tensor type (default f16), `dtype` the hf export's weights, `imatrix` a llama.cpp
    imatrix.dat file whose importance weights the gguf / gguf-base quantizer uses. Every check that
    needs no model runs first. Returns the manifests (each also written next to its output)."""
    targets = {k: Path(v) for k, v in (targets or {}).items()}
    _check(targets, quant, dtype, overwrite)
    src = resolve(run, adapter, model)
    if quant is not None and {"gguf", "gguf-base"} & set(targets):
        check_quant(quant, model_config(src.model))  # rows no block type takes: said before the long load
    imat = _imatrix(imatrix, quant, targets, src)
    if not src.base_is_gguf and {"gguf", "gguf-lora", "gguf-base"} & set(targets):
        check_hf_arch(model_config(src.model).model_type)
    # gguf-lora alone needs the LoRA matrices and the base's shapes, never its weights
    peft_model, tok = load(src, passphrase_file, weights=set(targets) != {"gguf-lora"})
    source_gguf = src.model if src.base_is_gguf else None
    records = []

    def write(kind, fn, **extra):
        t0 = time.perf_counter()
        out = targets[kind]
        try:
            with atomic_path(out, overwrite) as tmp:
                fn(tmp)
        except OSError as exc:
            raise ExportError(f"writing {out} failed: {exc.strerror or exc}; nothing was left under that name") from None
        q = quant or DEFAULT_QUANT.get(kind)
        rec = build_manifest(kind, out, src, q if kind != "hf" else None, dtype if kind == "hf" else None,
                             time.perf_counter() - t0, **extra)
        rec["manifest"] = str(write_manifest(rec, out))
        records.append(rec)

    if "gguf-lora" in targets:
        write("gguf-lora", lambda tmp: write_gguf_lora(peft_model, tmp, quant or "f16", source_gguf),
              base_gguf_needed=str(source_gguf) if source_gguf else None,
              base_as_trained=str(targets["gguf-base"]) if "gguf-base" in targets else None)
    # gguf and gguf-base stream from the 4-bit model, one layer folded (or decoded) at a time; it stays as it is
    if "gguf" in targets:
        write("gguf", lambda tmp: write_gguf(peft_model, tok, tmp, quant or "f16", source_gguf, imat))
    if "gguf-base" in targets:
        write("gguf-base", lambda tmp: write_gguf(peft_model, tok, tmp, quant or "f16", source_gguf, imat,
                                                  adapters=False))
    if "hf" in targets:  # a dense checkpoint by nature: merged in place, last
        t0 = time.perf_counter()
        merged = merge(peft_model, DTYPES[dtype])
        merge_s = time.perf_counter() - t0
        write("hf", lambda tmp: write_hf(merged, tok, tmp, DTYPES[dtype]), merge_seconds=round(merge_s, 2))
    return records
