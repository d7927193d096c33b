"""What the GGUF writers share: quant types the `gguf` package can write, HF -> GGUF tensor names,
llama.cpp's q/k row order, and tensor encoding."""
from __future__ import annotations

import gguf
import numpy as np
import torch

from .gguf_arch import HF_ARCHS  # HF model_type -> GGUF architecture
from .kquant import FILE_TYPES, K_TYPES, NATIVE_TYPES, check_rows, config_row_lengths, quantize
from .source import ExportError

# --quant name -> (tensor type, general.file_type). The gguf package writes the legacy types from Python;
# it only reads K-quants, which forge_rt._C writes (kquant.py); i-quants are not written.
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
QUANTS.update(FILE_TYPES)  # K-quant file types: llama.cpp's per-tensor mix, written by forge_rt._C (kquant.py)
# llama.cpp stores q/k rows of these architectures permuted (interleaved rotary halves per head).
PERMUTED_ARCHS = {"llama"}


def check_quant(quant: str, config=None) -> None:
    """`config` (the base's transformers config): also refuse a block type its row lengths cannot take."""
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: forge_rt cannot write it (i-quants are not supported); use one of "
                          f"{', '.join(QUANTS)}")
    if config is not None and QUANTS[quant][0] not in FLOAT_TYPES:
        check_rows(config_row_lengths(config), quant)


def check_hf_arch(model_type: str) -> str:
    if model_type not in HF_ARCHS:
        raise ExportError(f"model type {model_type!r} is not supported by the GGUF writer (supported: "
                          f"{', '.join(sorted(HF_ARCHS))}); export --to hf instead")
    return HF_ARCHS[model_type]


def name_map(arch: str, config) -> dict:
    """HF parameter name -> GGUF tensor name, for every parameter of a `config`-shaped model."""
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)


def gguf_name(tmap, hf_name: str) -> str | None:
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def to_llamacpp_rows(weight: torch.Tensor, gguf_tensor: str, config) -> torch.Tensor:
    """llama.cpp's q/k row order for permuted architectures: the inverse of the un-permutation transformers
    applies when it loads such a GGUF (rows of each head go from [half0 | half1] to interleaved pairs)."""
    if ".attn_q." in gguf_tensor:
        heads = config.num_attention_heads
    elif ".attn_k." in gguf_tensor:
        heads = config.num_key_value_heads
    else:
        return weight
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


# llama.cpp's own quantizer keeps the LM head (output.weight, or the tied token_embd) above 4-5 bits (Q6_K),
# as the shipped Q4_1 SmolLM2 file does (Q8_0); the gguf package writes no K-quants, so Q8_0 here. It does not
# rescue q4_0 on the 135M demo (bench/results/default_job/llamacpp_scores_2.json): the blocks are the loss.
_LOW_BIT = {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0,
            gguf.GGMLQuantizationType.Q5_1}


FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


def head_type(qtype):
    """The GGUF type of the LM head for a file of type `qtype`."""
    return gguf.GGMLQuantizationType.Q8_0 if qtype in _LOW_BIT else qtype


def stored_type(shape, qtype):
    """The type a tensor of `shape` is written as in a file of tensor type `qtype`: vectors stay F32 (as
    llama.cpp's converter keeps norms and biases); a matrix whose rows don't fill whole blocks falls back to F16."""
    if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16 or shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def encode(weight: torch.Tensor, qtype, imatrix: np.ndarray | None = None) -> tuple[np.ndarray, object]:
    """(array, raw_dtype) for GGUFWriter.add_tensor, of type stored_type(shape, qtype). `imatrix`: per-column
    importance weights (K-quants and legacy types then quantize as ggml does with an imatrix)."""
    data = weight.detach().float().contiguous().numpy()
    qtype = stored_type(data.shape, qtype)
    if qtype == gguf.GGMLQuantizationType.F32:
        return data, None
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    if qtype in K_TYPES or (imatrix is not None and qtype in NATIVE_TYPES):
        return quantize(data, qtype, imatrix), qtype
    return gguf.quants.quantize(data, qtype), qtype
