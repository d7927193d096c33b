"""`--to gguf`: the merged model as one GGUF file for llama.cpp.

A base that came from a GGUF keeps that file's metadata (architecture keys, tokenizer, chat template)
and tensor list; only the tensors are replaced (ones the model has no counterpart for, e.g. rope_freqs,
are copied as they are). A base from a HF directory gets metadata written here for the architectures
gguf_common knows, with a byte-level BPE tokenizer (tokenizer.json) or a SentencePiece one (tokenizer.model:
Llama 2, Mistral, Gemma; its pieces, scores and types read by gguf's SentencePieceVocab)."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from forge_rt.models.gguf_reader import GGUFReader

from .gguf_common import (PERMUTED_ARCHS, QUANTS, check_hf_arch, encode, gguf_name, head_type, name_map,
                          stored_type, to_llamacpp_rows)
from .gguf_stream import Planned, write_streamed
from .merge import lazy_weights
from .gguf_arch import check_rope, extra_tensors, rope_theta, to_file_values, write_arch_keys
from .imatrix import weights_for
from .kquant import FILE_TYPES, tensor_types
from .source import ExportError

# Reader pseudo-fields, and keys the writer sets itself (architecture) or rewrites (file type, quant version).
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def write_gguf(model, tokenizer, out: Path, quant: str, source_gguf: Path | None, imatrix: dict | None = None,
               adapters: bool = True) -> None:
    """Writes file `out` (the caller makes it atomic), one tensor at a time: `model` (a transformers model,
    or a PEFT model over it, 4-bit or not) is never merged as a whole; each LoRA layer is folded
    (`adapters`) or decoded as the base alone just before it is quantized and written.
    `imatrix`: GGUF tensor name -> importance weights."""
    qtype, ftype = QUANTS[quant]
    config = getattr(model, "get_base_model", lambda: model)().config
    if source_gguf is not None:
        reader = GGUFReader(source_gguf)
        arch = reader.fields["general.architecture"].contents()
        writer = gguf.GGUFWriter(out, arch)
        for field in reader.fields.values():
            if not field.name.startswith(_SKIP_KEYS):
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    else:
        arch = check_hf_arch(config.model_type)
        writer = gguf.GGUFWriter(out, arch)
        _write_hf_metadata(writer, config, tokenizer)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    weights = _gguf_weights(model, arch, config, adapters)
    layout = [(t.name, t) for t in reader.tensors] if source_gguf is not None else None
    if layout is None:  # HF source: every mapped parameter; a tied output layer is the embedding
        if getattr(config, "tie_word_embeddings", False):
            weights.pop("output.weight", None)
        weights.update({k: (tuple(v.shape), lambda v=v: v) for k, v in extra_tensors(arch, config).items()})
        layout = [(name, None) for name in weights]
    write_streamed(writer, _plan(layout, weights, quant, config, arch, source_gguf, imatrix))


def _gguf_weights(model, arch: str, config, adapters: bool) -> dict:
    """GGUF tensor name -> (shape, fn giving the fp32 weight as the model holds it)."""
    tmap = name_map(arch, config)
    weights = {}
    for hf_name, lazy in lazy_weights(model, adapters).items():
        name = gguf_name(tmap, hf_name)
        if name is not None:
            weights[name] = lazy
    return weights


def _plan(layout, weights: dict, quant: str, config, arch: str, source_gguf, imatrix) -> list[Planned]:
    """Every tensor of the file, in order, with its stored type and how to make its bytes."""
    qtype = QUANTS[quant][0]
    head = "output.weight" if any(name == "output.weight" for name, _ in layout) else "token_embd.weight"
    mix = _k_mix(quant, layout, weights, config, arch)
    plan = []
    for name, src in layout:
        if name not in weights:
            if src is None:
                raise ExportError(f"no weight for GGUF tensor {name}")
            plan.append(Planned(name, tuple(int(d) for d in reversed(src.shape.tolist())), src.tensor_type,
                                lambda src=src: src.data))
            continue
        shape, fn = weights[name]
        if src is not None and tuple(int(d) for d in reversed(src.shape.tolist())) != tuple(shape):
            raise ExportError(f"{name}: the model's weight is {tuple(shape)}, the source GGUF's is "
                              f"{tuple(reversed(src.shape.tolist()))}; is the model built from {source_gguf}?")
        qt = stored_type(shape, mix[name] if mix else head_type(qtype) if name == head else qtype)
        plan.append(Planned(name, tuple(shape), qt, lambda name=name, fn=fn, qt=qt: _encoded(
            name, fn(), qt, arch, config, imatrix)))
    return plan


def _encoded(name: str, tensor, qt, arch: str, config, imatrix) -> np.ndarray:
    if arch in PERMUTED_ARCHS:
        tensor = to_llamacpp_rows(tensor, name, config)
    tensor = to_file_values(arch, name, tensor)
    return encode(tensor, qt, weights_for(imatrix, name, tensor.shape[-1]) if tensor.dim() > 1 else None)[0]


def _k_mix(quant: str, layout, weights: dict, config, arch: str) -> dict | None:
    """Per-tensor types of a K-quant file type (llama.cpp's mix), None for single-type quants."""
    if quant not in FILE_TYPES:
        return None
    shapes = [(name, tuple(weights[name][0]) if name in weights else tuple(int(d) for d in reversed(src.shape.tolist())))
              for name, src in layout]
    return tensor_types(shapes, quant, config.num_hidden_layers, arch=arch, n_head=config.num_attention_heads,
                        n_head_kv=getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


# ---- metadata for a HF-directory base ------------------------------------------------------------

def _write_hf_metadata(w: gguf.GGUFWriter, config, tokenizer) -> None:
    check_rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    write_arch_keys(w, w.arch, config)
    _write_tokenizer(w, tokenizer, config.vocab_size)


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (its splitting regex), for the kinds we know."""
    text = json.dumps(spec)
    steps = spec.get("pretokenizers", [spec]) if spec else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"] and "ByteLevel" in kinds:
        if r"\\p{N}{1,3}" in text:
            return "llama-bpe"
        if r"\\p{N}|" in text:
            return "qwen2"
    raise ExportError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds)) or 'none'}) is not one the "
                      f"GGUF writer knows (gpt-2, smollm, llama-bpe, qwen2); llama.cpp would split text differently")


def _spm_pieces(tok) -> dict[int, tuple[bytes, float, int]]:
    """{id: (piece, score, type)} of a SentencePiece tokenizer from the tokenizer.model beside it: llama.cpp's
    SPM tokenizer merges by these scores (tokenizer.json has none), so they must be the model's own."""
    source = getattr(tok, "name_or_path", None)
    model_file = Path(source or "<unknown directory>") / "tokenizer.model"
    if not source or not model_file.is_file():
        raise ExportError(f"the tokenizer is SentencePiece-based but {model_file} is missing: llama.cpp needs its "
                          "piece scores; copy the model's tokenizer.model beside tokenizer.json, or export --to hf")
    from forge_rt.core.errors import require_extra
    with require_extra("export", "a GGUF of a SentencePiece tokenizer"):
        import sentencepiece  # noqa: F401 (gguf.SentencePieceVocab reads the file with it)
    vocab = gguf.SentencePieceVocab(model_file.parent)
    return {i: (piece, score, int(kind)) for i, (piece, score, kind) in enumerate(vocab.all_tokens())}


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts '▁' before the first word (Llama 2, Mistral) or not (Gemma)."""
    steps = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    steps = [t for s in steps for t in (s.get("normalizers") or s.get("pretokenizers") or [s])]
    return any((t.get("type") == "Prepend" and t.get("prepend") == "\u2581") or
               (t.get("type") == "Metaspace" and t.get("prepend_scheme", "always") != "never") for t in steps)


def _write_tokenizer(w: gguf.GGUFWriter, tok, vocab_size: int) -> None:
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    kind = spec.get("model", {}).get("type")
    spm = kind == "Unigram" or (kind == "BPE" and spec["model"].get("byte_fallback"))
    if kind != "BPE" and not spm:
        raise ExportError(f"the GGUF writer supports byte-level BPE and SentencePiece tokenizers, not {kind or 'this'} "
                          "one; export --to hf")
    pieces = _spm_pieces(tok) if spm else {i: (t, 0.0, gguf.TokenType.NORMAL) for t, i in tok.get_vocab().items()}
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i not in pieces and i not in added:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        piece, score, kind_i = pieces[i] if i in pieces else (added[i].content, -1000.0, gguf.TokenType.NORMAL)
        tokens.append(piece)
        scores.append(score)
        types.append(gguf.TokenType.CONTROL if i in added and added[i].special else
                     gguf.TokenType.USER_DEFINED if i in added and kind_i == gguf.TokenType.NORMAL else kind_i)
    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(_space_prefix(spec))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        if getattr(tok, attr, None) is not None:
            add(getattr(tok, attr))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)
