"""Streaming NF4 load: the causal LM is built on the meta device, then filled tensor by tensor from its
safetensors shards or GGUF file; each targeted linear is quantized to NF4 as soon as its tensors arrive, the
rest (embeddings, norms, LM head) is materialised in the model dtype. Peak memory is the NF4 model, the
non-quantized tensors and one tensor in flight: a 7B model never exists in full precision.

The result is byte for byte what `from_pretrained(dtype=...)` followed by `quantize_model` gives."""
from __future__ import annotations

import json
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

from forge_rt import nf4
from forge_rt.nn import NF4Linear
from forge_rt.models.paths import ModelLoadError, check_causal, model_config

# model_type values whose layouts (names, fused qkv / gate_up, tied heads, GGUF conversion) are tested.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_DROP_EVERY = 256 << 20  # GGUF: hand the mapped pages read so far back every this many bytes


class WeightsError(ModelLoadError):
    """Model weights that cannot fill their model: truncated, incomplete or of the wrong shapes (training
    checkpoints have their own train.checkpoint.CheckpointError)."""


def _st_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {tensor: entry}) of a safetensors file, every tensor checked to lie inside it."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 0 or n > size - 8:
            raise WeightsError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of "
                                  f"{size}); copy the shard again")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise WeightsError(f"{path} has a corrupt header ({exc}); copy the shard again") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        end = 8 + n + entry["data_offsets"][1]
        if end > size:
            raise WeightsError(f"{path} is truncated: tensor {name} ends at byte {end} but the file has {size}; "
                                  "copy the shard again")
    return 8 + n, header


def _shards(model_dir: Path) -> tuple[list[Path], dict]:
    """The shards to read and the index's {tensor: shard name} (empty without an index)."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors")), {}
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [model_dir / f for f in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{f} is listed in {index} but missing; copy all the shards")
    return files, weight_map


def safetensors_tensors(model_dir: Path):
    """(name, file, bytes, read) for every tensor of a HF directory, shard by shard. Plain reads, not
    safe_open's memory map: the mapped pages a map touches stay in RSS until it closes (a whole 10 GB shard)."""
    files, weight_map = _shards(model_dir)
    headers = [(f, *_st_header(f)) for f in files]  # all checked before the first byte is quantized
    for f, _, header in headers:
        listed = [t for t, shard in weight_map.items() if shard == f.name and t not in header]
        if listed:
            raise WeightsError(f"{f} lacks tensor {listed[0]} (listed for it in model.safetensors.index.json"
                                  f"{f', and {len(listed) - 1} more' if len(listed) > 1 else ''}); copy the shard again")
    for f, start, header in headers:
        with open(f, "rb") as fh:
            for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                yield name, f, e["data_offsets"][1] - e["data_offsets"][0], (
                    lambda fh=fh, e=e: _st_read(fh, start, e))


def _st_read(fh, start: int, entry: dict) -> torch.Tensor:
    a, b = entry["data_offsets"]
    buf = torch.empty(b - a, dtype=torch.uint8)
    fh.seek(start + a)
    fh.readinto(buf.numpy())
    return buf.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def gguf_tensors(path: Path, skeleton: nn.Module):
    """(name, file, bytes, read) for every tensor of a GGUF file, dequantized to fp32 one at a time and
    converted by transformers' own GGUF helpers (names, llama.cpp's q/k row permutation, Gemma's norm
    offset). `name` is None for tensors the model has no parameter for (e.g. rope_freqs)."""
    import numpy as np
    from gguf import dequantize
    from forge_rt.models.gguf_reader import GGUFReader, fast_gguf
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)
    try:
        # A reader for this load only: the tensor pages it touches through the memory map stay in RSS until
        # the map closes, which must be when the load ends.
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise WeightsError(f"could not load model from {path}: the GGUF is truncated or corrupt "
                              f"({type(exc).__name__}: {exc}); copy it again") from None
    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=skeleton.config.to_dict())
    with fast_gguf():
        names = get_gguf_hf_weights_map(skeleton, processor)
    since_drop = 0
    for t in reader.tensors:
        def read(t=t):
            w = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                  tensor_key_mapping=names, parsed_parameters={}).weights
            return torch.from_numpy(np.require(w, requirements=("C", "W")))  # F32 comes back as a read-only map view
        yield names.get(t.name), path, int(t.n_bytes), read
        since_drop += int(t.n_bytes)
        if since_drop > _DROP_EVERY:  # the map's touched pages count in RSS: give them back (page cache keeps them)
            reader.mapped._mmap.madvise(mmap.MADV_DONTNEED)
            since_drop = 0


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary frequencies are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head then is not a parameter of its own to load
    return model


def _place(model: nn.Module, name: str, tensor: torch.Tensor, source: Path) -> None:
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = mod._parameters[pname]
    if tuple(old.shape) != tuple(tensor.shape):
        raise WeightsError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(old.shape)}; the checkpoint does not match its config.json")
    mod._parameters[pname] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def _install_nf4(model: nn.Module, mod_name: str, parts: dict, source: Path) -> None:
    linear = model.get_submodule(mod_name)
    w = parts["weight"]
    if tuple(w.shape) != tuple(linear.weight.shape):
        raise WeightsError(f"{source}: tensor {mod_name}.weight has shape {tuple(w.shape)}, the model expects "
                              f"{tuple(linear.weight.shape)}; the checkpoint does not match its config.json")
    parent, _, child = mod_name.rpartition(".")
    # The same settings as quantize_model's defaults, so both paths give the same bytes.
    setattr(model.get_submodule(parent), child, NF4Linear(nf4.quantize(w), parts.get("bias")))


def fill(model: nn.Module, tensors, dtype: torch.dtype, source: Path, total_bytes: int) -> int:
    """Loads every parameter of the meta `model` from `tensors`, quantizing each nn.Linear but the LM head
    to NF4 as soon as its weight (and bias) are in; returns the number quantized."""
    from tqdm import tqdm
    head = model.get_output_embeddings()
    targets = {n: {p for p, _ in m.named_parameters()} for n, m in model.named_modules()
               if type(m) is nn.Linear and m is not head}
    expected = {n for n, _ in model.named_parameters()}
    loaded, pending, quantized = set(), {}, 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading", file=sys.stderr,
               disable=not sys.stderr.isatty())
    for name, path, nbytes, read in tensors:
        if name in expected and name not in loaded:
            mod_name, _, pname = name.rpartition(".")
            tensor = read().to(dtype)
            if mod_name in targets:
                parts = pending.setdefault(mod_name, {})
                parts[pname] = tensor
                if set(parts) == targets[mod_name]:
                    _install_nf4(model, mod_name, pending.pop(mod_name), path)
                    quantized += 1
            else:
                _place(model, name, tensor, path)
            loaded.add(name)
        bar.update(nbytes)
        bar.set_postfix(quantized=quantized, refresh=False)
    bar.close()
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise WeightsError(f"{source} does not hold {len(missing)} tensor(s) of its model: {shown}; the "
                              "checkpoint is incomplete (copy it again, or check that all weight shards are there)")
    model.tie_weights()
    return quantized


def load_nf4(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A HF directory of safetensors shards or a .gguf file, streamed into a model whose linears (all
    but the LM head) are NF4Linear."""
    from transformers import GenerationConfig
    gguf_file = path.is_file()
    if not gguf_file:
        check_causal(path)
    config = model_config(path)
    if config.model_type not in SUPPORTED:
        raise ModelLoadError(f"{path}: model type {config.model_type!r} has no streaming NF4 loader (supported: "
                             f"{', '.join(SUPPORTED)}); train it with --no-fused (full-precision base) instead")
    model = skeleton(config, dtype)
    if gguf_file:
        tensors, total = gguf_tensors(path, model), path.stat().st_size
    else:
        tensors = safetensors_tensors(path)
        total = sum(f.stat().st_size for f in _shards(path)[0])
    fill(model, tensors, dtype, path, total)
    if (path / "generation_config.json").is_file():  # as from_pretrained reads it (a GGUF has none)
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
