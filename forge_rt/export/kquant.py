"""K-quant GGUF files: ggml's block quantizers (forge_rt._C, byte-identical to ggml_quantize_chunk) and
the per-tensor type mix llama.cpp's quantizer (src/llama-quant.cpp) applies for the K file types: the LM
head gets Q6_K, some attn_v / ffn_down layers get more bits, and rows whose length is not a multiple of
256 fall back to a 32-value type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0)."""
from __future__ import annotations

import re

import gguf
import numpy as np

from .source import ExportError

Q = gguf.GGMLQuantizationType
# --quant name -> (default tensor type, general.file_type)
FILE_TYPES = {
    "q4_k_m": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q4_k_s": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k_m": (Q.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (Q.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
}
# Types forge_rt._C writes (K-quants and the legacy types they fall back to).
NATIVE_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def _native():
    from forge_rt.core.native import require_native
    return require_native()


def quantize(data: np.ndarray, qtype, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of `data` (2-D, or more with the rows along the last axis) as ggml's blocks of `qtype`:
    uint8 of shape (..., row bytes), what GGUFWriter.add_tensor takes with raw_dtype=qtype. `imatrix`:
    one importance weight per column (llama.cpp imatrix semantics), or None."""
    qtype = Q(qtype)
    if qtype not in NATIVE_TYPES:
        raise ExportError(f"GGML type {qtype.name} is not written by forge_rt (writes {', '.join(t.name for t in NATIVE_TYPES)})")
    x = np.ascontiguousarray(data, dtype=np.float32)
    if x.ndim < 2:
        raise ExportError(f"{qtype.name} quantizes matrices; got shape {x.shape}")
    n_per_row = x.shape[-1]
    values, nbytes = _native().ggml_block_size(int(qtype))
    if n_per_row % values:
        raise ExportError(f"{qtype.name} needs rows of a multiple of {values} values; these rows have {n_per_row}")
    w = None
    if imatrix is not None:
        w = np.ascontiguousarray(imatrix, dtype=np.float32)
        if w.shape != (n_per_row,):
            raise ExportError(f"importance weights of shape {w.shape} do not fit rows of {n_per_row} values")
    out = np.empty(x.shape[:-1] + (n_per_row // values * nbytes,), dtype=np.uint8)
    nrows = int(np.prod(x.shape[:-1]))
    _native().ggml_quantize(int(qtype), x.ctypes.data, nrows, n_per_row, 0 if w is None else w.ctypes.data,
                            out.ctypes.data)
    return out


# ---- llama.cpp's per-tensor type mix ---------------------------------------------------------------

_SKIP_PARTS = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d",
               "attn_rel_b.weight", "position_embd", "token_types")


def quantizable(name: str, shape) -> bool:
    """llama.cpp quantizes only matrices named *weight that are not norms, gates of experts or small tables."""
    return len(shape) >= 2 and name.endswith("weight") and not any(p in name for p in _SKIP_PARTS)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for cat in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat.removesuffix(".weight")
    return "other"


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


_ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")  # llama.cpp treats fused qkv and MLA's kv_b as attn_v


def _mixed_type(file_type: str, cat: str, i: int, n: int, ncols: int, tied: bool, is_70b: bool):
    """Type before the row-length fallback; i: this tensor's index among its category, n: their count."""
    if cat == "output" or (tied and cat == "token_embd"):
        return Q.Q8_0 if ncols % 256 else Q.Q6_K
    t = FILE_TYPES[file_type][0]
    if cat in _ATTN_V:
        if file_type in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            t = Q.Q6_K
        elif file_type == "q4_k_s" and i < 4:
            t = Q.Q5_K
        if is_70b and t == Q.Q4_K:  # 8 heads share attn_v there: more bits cost little
            t = Q.Q5_K
    elif cat == "ffn_down":
        if file_type in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            t = Q.Q6_K
        elif file_type == "q4_k_s" and i < n // 8:
            t = Q.Q5_K
    return t


def tensor_types(tensors, file_type: str, n_layer: int, *, arch: str = "", n_head: int = 0,
                 n_head_kv: int = 0) -> dict:
    """GGUF tensor name -> GGML type for `file_type`, as llama.cpp's quantizer chooses it. `tensors`:
    (GGUF name, shape in torch order: rows, columns). Tensors llama.cpp does not quantize map to F32
    (vectors) or F16 (other matrices)."""
    if file_type not in FILE_TYPES:
        raise ExportError(f"unknown K-quant file type {file_type!r}; use one of {', '.join(FILE_TYPES)}")
    shapes = dict(tensors)
    tied = "output.weight" not in shapes
    is_70b = arch == "llama" and n_layer == 80 and n_head != n_head_kv
    n_attn_v = sum(1 for name in shapes if _category(name) in _ATTN_V)
    counters = {"attn_v": 0, "ffn_down": 0}
    result = {}
    for name in sorted(shapes, key=lambda s: (_layer(s), s)):  # llama.cpp's loader order: by layer, then name
        shape = tuple(shapes[name])
        if not quantizable(name, shape):
            result[name] = Q.F32 if len(shape) < 2 else Q.F16
            continue
        cat = _category(name)
        key = "attn_v" if cat in _ATTN_V else cat
        i = counters.get(key, 0)
        n = n_attn_v if key == "attn_v" else n_layer
        t = _mixed_type(file_type, cat, i, n, shape[-1], tied, is_70b)
        if key in counters:
            counters[key] += 1
        if shape[-1] % 256 and t in _FALLBACK:
            t = _FALLBACK[t]
        if shape[-1] % 32:  # not even a 32-value type fits: llama.cpp keeps such a tensor in F16
            t = Q.F16
        result[name] = t
    return result


def check_rows(row_lengths, quant: str) -> None:
    """One clear error before any long work when the model's matrices have rows no 32-value block fits
    (llama.cpp would silently keep them F16, so the file would not be the type asked for)."""
    bad = sorted({int(n) for n in row_lengths if int(n) % 32})
    if bad:
        raise ExportError(f"--quant {quant}: this model's matrices have rows of {', '.join(map(str, bad))} values, "
                          f"not a multiple of 32, which no GGML block type takes; use --quant f16, bf16 or f32")


def config_row_lengths(config) -> set:
    """Row lengths of a decoder's matrices: hidden (q/k/v, gate/up, embeddings, head), the MLP width
    (down) and heads x head_dim (attention output)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {config.hidden_size, config.intermediate_size, heads * head_dim}
