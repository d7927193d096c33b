"""A HF directory with a SentencePiece tokenizer (tokenizer.model, byte fallback: the Llama 2 / Mistral kind) to
GGUF: llama.cpp, given the prompt as text, must split it as the HF tokenizer did -- checked through a random
tiny Llama, whose greedy continuation and log-probs in llama.cpp equal PyTorch's on the HF ids only if both
saw the same tokens. The SentencePiece model is trained here by sentencepiece itself on the demo's text."""
import json
import shutil

import pytest

from arch_models import assert_llamacpp_matches

from forge_rt.export.source import ExportError
from forge_rt.testing import make_tiny_model_dir

pytest.importorskip("xllamacpp")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model through sentencepiece's protobuf schema

TEXT = "Triage:  Temperature 77 C, café naïve 東京 12345 {\"status\": \"OK\"}"


@pytest.fixture(scope="module", params=[True, False], ids=["space_prefix", "no_space_prefix"])
def spm_llama(request, tmp_path_factory):
    """(HF directory of a random tiny Llama with a SentencePiece tokenizer, that tokenizer): one that puts '▁'
    before the first word (Llama 2, Mistral), one that does not (Gemma)."""
    from transformers import AutoTokenizer
    from forge_rt.data.examples import demo_paths
    root = tmp_path_factory.mktemp("spm")
    rows = [json.loads(line) for line in demo_paths()["train"].read_text().splitlines()]
    (root / "corpus.txt").write_text("\n".join(r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2, add_dummy_prefix=request.param)
    src = root / "tok"
    src.mkdir()
    shutil.copy(root / "sp.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = tok.eos_token
    model_dir = make_tiny_model_dir(root / "hf", tok)
    shutil.copy(root / "sp.model", model_dir / "tokenizer.model")  # save_pretrained writes tokenizer.json only
    if not request.param:  # transformers' LlamaTokenizer prepends '▁' unless its config says not to
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": False}))
    return model_dir, AutoTokenizer.from_pretrained(model_dir)


def test_llamacpp_splits_text_like_the_hf_tokenizer(spm_llama, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM
    from forge_rt.export.gguf_model import write_gguf
    model_dir, tok = spm_llama
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = tmp_path / "spm.gguf"
    write_gguf(model, tok, out, "f32", None)
    fields = gguf.GGUFReader(out).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]) == b"llama"
    prefix = tok.convert_ids_to_tokens(tok("Temperature").input_ids)[0].startswith("\u2581")
    assert bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0]) == prefix
    proc = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    scores = fields["tokenizer.ggml.scores"]
    assert [float(scores.parts[i][0]) for i in scores.data[:600]] == [proc.GetScore(i) for i in range(600)]
    ids = tok(TEXT).input_ids
    assert len(ids) > 20 and any(proc.IsByte(i) for i in ids)  # 東京 falls back to bytes
    assert_llamacpp_matches(model, out, tok, prompt=TEXT)


def test_a_missing_tokenizer_model_is_said(spm_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from forge_rt.export.gguf_model import write_gguf
    model_dir, _ = spm_llama
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "tokenizer.model").unlink()
    with pytest.raises(ExportError, match="tokenizer.model is missing"):
        write_gguf(AutoModelForCausalLM.from_pretrained(bare), AutoTokenizer.from_pretrained(bare), tmp_path / "x.gguf",
                   "f32", None)


def test_a_run_keeps_the_tokenizer_model_its_export_needs(spm_llama, tmp_path):
    """A run's tokenizer/ (what `forge_rt.export RUN` loads) holds tokenizer.model, which save_pretrained leaves out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from forge_rt.export.gguf_model import write_gguf
    from forge_rt.train.place import save_adapter
    model_dir, tok = spm_llama
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    save_adapter(model, tok, tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.model").read_bytes() == (model_dir / "tokenizer.model").read_bytes()
    write_gguf(model, AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), tmp_path / "run.gguf", "f32", None)
