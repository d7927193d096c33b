"""Helpers of the architecture tests: tiny models as GGUF files, GGUF files whose tensors mix every GGML
type (blocks written by ggml itself, from the xllamacpp wheel, through ctypes), and llama.cpp's greedy
continuation with its log-probabilities beside PyTorch's on the same tokens (the oracle for an export)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

PROMPT = "The capital of France is"


def write_source_gguf(model_dir: Path, tok, out: Path, quant: str = "f32") -> Path:
    """The HF directory's model as a GGUF written by forge_rt's own writer (the tests' source file)."""
    from transformers import AutoModelForCausalLM
    from forge_rt.export.gguf_model import write_gguf
    write_gguf(AutoModelForCausalLM.from_pretrained(model_dir), tok, out, quant, None)
    return out


def llamacpp_steps(gguf_path: Path, ids: list[int] | str, n: int, lora: Path | None = None,
                   tok=None) -> list[tuple[int, dict]]:
    """n greedy steps of llama.cpp from prompt `ids` (or a text it tokenizes): (chosen token, {token: log-prob}
    of its top 5). The server folds a token that ends mid-character into the next step's entry (its `bytes`
    then hold both, its id the last): with `tok`, the steps stop before the first such entry."""
    from forge_rt.eval.llamacpp import LlamaCppEngine
    engine = LlamaCppEngine(gguf_path, lora, n_ctx=256, threads=1)
    res = engine.server.handle_completions({"prompt": ids if isinstance(ids, str) else list(ids), "n_predict": n,
                                            "temperature": 0.0, "top_k": 1, "n_probs": 5, "samplers": ["top_k"]})
    assert "error" not in res, res
    steps = res["choices"][0]["logprobs"]["content"]
    if tok is not None:
        whole = [bytes(s["bytes"]) == token_bytes(tok, s["id"]) for s in steps]
        steps = steps[:whole.index(False) if False in whole else len(steps)]
    return [(s["id"], {t["id"]: t["logprob"] for t in s["top_logprobs"]}) for s in steps]


def token_bytes(tok, i: int) -> bytes:
    """The bytes token `i` stands for: a SentencePiece byte piece (<0xXX>), a byte-level BPE token, or a piece
    with '▁' for spaces."""
    import re
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    piece = tok.convert_ids_to_tokens(i)
    if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
        return bytes([int(m[1], 16)])
    table = {c: b for b, c in bytes_to_unicode().items()}
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return piece.replace("\u2581", " ").encode()


def assert_llamacpp_matches(model, gguf_path: Path, tok, lora: Path | None = None, n: int = 8, tol: float = 2e-3,
                            prompt: str | None = None):
    """llama.cpp's greedy continuation of PROMPT is PyTorch's (up to ties within `tol`), and its top log-probs
    at every step equal PyTorch's log-softmax on the same tokens within `tol`. With `prompt`, llama.cpp gets
    that text and tokenizes it itself (PyTorch the HF tokenizer's ids): its tokenizer is then checked too."""
    ids = tok(prompt or PROMPT).input_ids
    steps = llamacpp_steps(gguf_path, prompt if prompt is not None else ids, n, lora, tok)
    assert 0 < len(steps) <= n  # fewer at an end-of-generation token or a token folded into the next (see above)
    full = torch.tensor([ids + [t for t, _ in steps]])
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].double(), -1)[len(ids) - 1:-1]
    for i, (chosen, top) in enumerate(steps):
        assert logp[i, chosen] >= logp[i].max() - tol, (i, chosen, logp[i].argmax().item())
        for t, lp in top.items():
            assert abs(logp[i, t].item() - lp) < tol, (i, t, logp[i, t].item(), lp)


# ---- every GGML type -------------------------------------------------------------------------------

def _ggml_lib():
    from forge_rt.testing import ggml_quantizer
    lib = ggml_quantizer()
    if lib is None:
        pytest.skip("xllamacpp (ggml's quantizer) is not installed: pip install 'forge_rt[export]'")
    return lib


def ggml_blocks(qtype, x: np.ndarray) -> np.ndarray:
    """Rows of `x` as ggml's blocks of `qtype` (uint8, rows x row bytes), quantized by ggml itself, with unit
    importance weights (which some i-quants require)."""
    lib = _ggml_lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n = x.shape
    out = np.zeros((nrows, lib.ggml_row_size(int(qtype), n)), dtype=np.uint8)
    ones = np.ones(n, dtype=np.float32)
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n, ones.ctypes.data)
    return out


def retype_gguf(src: Path, out: Path, types: dict) -> Path:
    """`src` rewritten with tensor name -> GGML type from `types` (others as they are), metadata copied."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        qtype = types.get(t.name)
        if qtype is None:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        x = gguf.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if qtype == gguf.GGMLQuantizationType.F64:
            writer.add_tensor(t.name, x.astype(np.float64))
        elif qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            writer.add_tensor(t.name, x.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32))
        elif qtype == gguf.GGMLQuantizationType.BF16:
            writer.add_tensor(t.name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, ggml_blocks(qtype, x), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
