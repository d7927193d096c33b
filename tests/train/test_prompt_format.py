"""Prompt formats (forge_rt.data.formats): a base model without a chat template trains on prompt/completion and
chat rows; what each format renders, checked against text written out by hand; refusal of a format whose tokens
the tokenizer lacks; the chosen format travels with the run (report, metrics, saved tokenizer, generate)."""
import json
import shutil

import pytest

from forge_rt.cli import train
from forge_rt.data import formats, tokenize_examples
from forge_rt.data.examples import Examples
from forge_rt.testing import tiny_args, tiny_rows, write_jsonl

PC = [{"role": "user", "content": "Reading 3: 61 C. Verdict?"}, {"role": "assistant", "content": '{"status": "OK"}'}]


@pytest.fixture(scope="module")
def base_model(tiny, tmp_path_factory):
    """The tiny model with its chat template removed: what a base checkpoint looks like."""
    model_dir = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny[0], model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (model_dir / extra).unlink(missing_ok=True)
    return model_dir


def _tok(model_dir):
    from forge_rt.models import load_tokenizer
    return load_tokenizer(model_dir)


def test_the_base_fixture_has_no_chat_template(base_model):
    assert not getattr(_tok(base_model), "chat_template", None)


def test_plain_is_the_prompt_then_the_completion_as_written(smol_tok):
    fmt = formats.resolve("plain", smol_tok, "prompt_completion")
    fmt.apply(tok := _copy(smol_tok))
    full = tok.apply_chat_template(PC, tokenize=False)
    assert full == PC[0]["content"] + PC[1]["content"] + tok.eos_token
    assert tok.apply_chat_template(PC[:1], tokenize=False, add_generation_prompt=True) == PC[0]["content"]


def test_alpaca_renders_the_sections(smol_tok):
    tok = _copy(smol_tok)
    formats.resolve("alpaca", tok, "chat").apply(tok)
    want = (formats.ALPACA_PREAMBLE + "\n\n### Instruction:\n" + PC[0]["content"] + "\n\n### Response:\n"
            + PC[1]["content"] + tok.eos_token + "\n\n")
    assert tok.apply_chat_template(PC, tokenize=False) == want
    system = [{"role": "system", "content": "Be terse."}, *PC]
    assert tok.apply_chat_template(system, tokenize=False).startswith("Be terse.\n\n### Instruction:\n")


def test_labels_cover_the_completion_and_eos_only(smol_tok):
    tok = _copy(smol_tok)
    formats.resolve("plain", tok, "prompt_completion").apply(tok)
    data = tokenize_examples(Examples([{"messages": PC, "line": 1}], "prompt_completion", "x"), tok, 64)
    labelled = [t for t in data.labels[0] if t != -100]
    assert tok.decode(labelled) == PC[1]["content"] + tok.eos_token


def test_model_format_falls_back_without_a_template_and_says_why(base_model, smol_tok):
    tok = _tok(base_model)
    assert formats.resolve("model", tok, "prompt_completion").name == "plain"
    chat = formats.resolve("model", tok, "chat")
    assert chat.name == "alpaca" and "no chat template" in chat.reason
    assert formats.resolve("model", smol_tok, "chat").template is None  # the model's own template is kept


def test_chatml_is_refused_when_the_tokenizer_lacks_its_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "</s>": 1, "reading": 2, "ok": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    with pytest.raises(formats.PromptFormatError, match=r"<\|im_start\|>.*alpaca or plain"):
        formats.resolve("chatml", tok, "chat")
    assert len(tok) == 4  # nothing was added to the vocabulary


@pytest.mark.slow
@pytest.mark.parametrize("rows", ["prompt_completion", "chat"])
def test_a_base_model_trains_and_the_run_names_its_format(base_model, tmp_path, rows):
    data = tiny_rows(12)
    if rows == "chat":
        data = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
                for r in data]
    path = write_jsonl(tmp_path / "train.jsonl", data)
    run = tmp_path / "run"
    assert train.main(tiny_args(base_model, path, run, "--max-steps", "2")) == 0
    want = "plain" if rows == "prompt_completion" else "alpaca"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["prompt_format"]["name"] == want
    assert f"prompt format: {want}" in (run / "report.md").read_text()
    saved = _saved_tokenizer(run)
    assert saved.chat_template == formats.TEMPLATES[want]  # generate / eval / export read it from here


def test_a_format_needing_missing_tokens_stops_before_the_run_dir(base_model, tmp_path, capsys, monkeypatch):
    from forge_rt.data import formats as f
    monkeypatch.setitem(f.NEEDS_TOKENS, "chatml", ("<|not_in_any_vocab|>",))
    run = tmp_path / "run"
    path = write_jsonl(tmp_path / "train.jsonl", tiny_rows(4))
    assert train.main(tiny_args(base_model, path, run, "--prompt-format", "chatml")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prompt-format chatml needs"), err
    assert not run.exists()


def _copy(tok):
    import copy
    return copy.deepcopy(tok)


def _saved_tokenizer(run):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(run / "tokenizer")
