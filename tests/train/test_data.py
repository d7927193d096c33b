import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forge_rt.data import DataError, collate, demo_paths, load_examples, tokenize_examples

ROOT = Path(__file__).resolve().parents[2]


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}]}
PC = {"prompt": "Capital of France?", "completion": "Paris"}


# --- format detection ---------------------------------------------------------------------------

def test_alpaca_jsonl(tmp_path):
    ex = load_examples(_jsonl(tmp_path, [ALPACA, {"instruction": "Say hi.", "output": "hi"}]))
    assert ex.format == "alpaca" and len(ex) == 2
    assert ex[0]["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                 {"role": "assistant", "content": "5"}]
    assert ex[1]["messages"][0]["content"] == "Say hi."  # no input: instruction alone
    assert [e["line"] for e in ex] == [1, 2]


def test_chat_json_array_keeps_line_numbers(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[\n" + json.dumps(CHAT) + ",\n\n" + json.dumps(CHAT, indent=1) + "\n]\n")
    ex = load_examples(p)
    assert ex.format == "chat" and len(ex) == 2
    assert ex[0]["messages"] == CHAT["messages"]
    assert [e["line"] for e in ex] == [2, 4]


def test_prompt_completion_skips_blank_lines(tmp_path):
    p = _jsonl(tmp_path, [PC, "", PC])
    ex = load_examples(p)
    assert ex.format == "prompt_completion" and len(ex) == 2 and ex[1]["line"] == 3
    assert ex[0]["messages"][-1] == {"role": "assistant", "content": "Paris"}


# --- bad input: every error names file, line and field, and says how to fix it -------------------

BAD_ROWS = [
    ([ALPACA, {"instruction": "x"}], 2, "output"),
    ([ALPACA, {"instruction": 5, "output": "y"}], 2, "instruction"),
    ([ALPACA, {"instruction": "x", "input": ["a"], "output": "y"}], 2, "input"),
    ([ALPACA, {"instruction": "x", "output": "   "}], 2, "output"),
    ([PC, {"prompt": "p", "completion": None}], 2, "completion"),
    ([{"messages": "hi"}], 1, "messages"),
    ([{"messages": []}], 1, "messages"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}], 1, "messages[1].role"),
    ([{"messages": [{"role": "user", "content": "q"}]}], 1, "messages[0].role"),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}], 1, "content"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}], 1, "messages"),
    ([{"messages": ["hi"]}], 1, "messages[0]"),
]


@pytest.mark.parametrize("rows,line,field", BAD_ROWS)
def test_bad_row_names_file_line_field(tmp_path, rows, line, field):
    p = _jsonl(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_examples(p)
    e = err.value
    assert (e.line, e.field) == (line, field)
    msg = str(e)
    assert str(p) in msg and f"line {line}" in msg and f"'{field}'" in msg and "Fix:" in msg


@pytest.mark.parametrize("rows,line,needle", [
    ([ALPACA, CHAT], 2, "mixed formats"),
    ([ALPACA, '{"instruction": "x", "output": '], 2, "invalid JSON"),
    ([ALPACA, '[1, 2]'], 2, "expected a JSON object"),
    ([{"text": "free text"}], 1, "unknown row form"),
    ([{"instruction": "x", "output": "y", "messages": []}], 1, "unknown row form"),  # ambiguous
])
def test_bad_file_structure(tmp_path, rows, line, needle):
    p = _jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=needle) as err:
        load_examples(p)
    assert err.value.line == line and str(p) in str(err.value)


def test_bad_json_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[\n" + json.dumps(PC) + ",\n{\"prompt\": \n")
    with pytest.raises(DataError, match="invalid JSON") as err:
        load_examples(p)
    assert err.value.line == 3
    p.write_text("[" + json.dumps(PC))
    with pytest.raises(DataError, match="not closed"):
        load_examples(p)


@pytest.mark.parametrize("content,needle", [("", "empty dataset"), ("\n\n", "empty dataset"),
                                            ("[]", "empty dataset"), (b"\xff\xfe\x00", "cannot be read")])
def test_empty_or_unreadable(tmp_path, content, needle):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=needle):
        load_examples(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        load_examples(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value)
    with pytest.raises(DataError, match="directory"):
        load_examples(tmp_path)


# --- shipped demo data ------------------------------------------------------------------------------

def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "tools" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_files_are_the_generator_output():
    paths = demo_paths()
    train, held_out = load_examples(paths["train"]), load_examples(paths["eval"])
    assert train.format == held_out.format == "alpaca"
    assert len(train) == 623 and len(held_out) >= 200
    prompts = {e["messages"][0]["content"] for e in train}
    assert not prompts & {e["messages"][0]["content"] for e in held_out}, "eval must be held out"
    assert len(prompts) == len(train)
    assert len(paths["retention"].read_text().split()) > 500
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--check"], capture_output=True)
    assert r.returncode == 0, r.stderr


def test_triage_rules_on_hand_made_readings():
    triage = _generator().triage
    base = {"temp": 60, "trend": "steady", "vibration": 2.0, "pressure": 4.0, "note": "no remarks"}
    cases = [
        ({}, "NORMAL", "NONE"),
        ({"temp": 100}, "SHUTDOWN", "OVERHEAT"),
        ({"temp": 99}, "INSPECT", "TEMP_HIGH"),
        ({"temp": 85}, "INSPECT", "TEMP_HIGH"),
        ({"temp": 84}, "NORMAL", "NONE"),
        ({"temp": 75, "trend": "rising"}, "INSPECT", "TEMP_RISING"),
        ({"temp": 74, "trend": "rising"}, "NORMAL", "NONE"),
        ({"vibration": 10.0}, "SHUTDOWN", "VIB_CRITICAL"),
        ({"vibration": 9.9, "temp": 90}, "INSPECT", "TEMP_HIGH"),  # temperature ranks first
        ({"vibration": 6.0}, "INSPECT", "VIB_HIGH"),
        ({"pressure": 2.4}, "INSPECT", "LOW_PRESSURE"),
        ({"pressure": 2.5}, "NORMAL", "NONE"),
        ({"note": "oil leak at the seal"}, "INSPECT", "LEAK"),
        ({"note": "smoke seen", "temp": 120, "vibration": 12.0}, "SHUTDOWN", "SMOKE"),
        ({"note": "fluid leak", "pressure": 1.0}, "INSPECT", "LOW_PRESSURE"),
    ]
    for change, status, code in cases:
        v = triage({**base, **change})
        assert (v["status"], v["fault_code"]) == (status, code), change
        assert v["reason"]


# --- tokenization -----------------------------------------------------------------------------------

def _examples(tmp_path, rows):
    return load_examples(_jsonl(tmp_path, rows))


def test_labels_cover_exactly_the_response(smol_tok, tmp_path):
    tok = smol_tok
    ex = _examples(tmp_path, [ALPACA, {"instruction": "Name a colour.", "output": "Blue, or maybe green."}])
    data = tokenize_examples(ex, tok, max_len=512)
    assert data.n_truncated == 0 and len(data) == 2 and not data.packed
    for e, ids, labels in zip(ex, data.input_ids, data.labels):
        assert len(ids) == len(labels)
        kept = [t for t in labels if t != -100]
        assert tok.decode(kept) == e["messages"][-1]["content"] + tok.eos_token
        # labelled tokens form one suffix, aligned with the inputs
        first = labels.index(kept[0])
        assert all(t == -100 for t in labels[:first]) and labels[first:] == ids[first:]
        # oracle: the same ids as tokenizing the whole rendered conversation at once
        full = tok.apply_chat_template(e["messages"], tokenize=False)
        assert ids == tok(full, add_special_tokens=False)["input_ids"][:len(ids)]


def test_truncation_is_counted(smol_tok, tmp_path):
    tok = smol_tok
    long = {"instruction": "Repeat.", "output": "word " * 60}
    ex = _examples(tmp_path, [ALPACA, long, ALPACA])
    prompt_len = tokenize_examples(ex, tok, 512).labels[1].count(-100)
    data = tokenize_examples(ex, tok, max_len=prompt_len + 10)
    assert data.n_truncated == 1 and data.truncated_lines == [2]
    assert len(data.input_ids[1]) == prompt_len + 10
    assert sum(t != -100 for t in data.labels[1]) == 10
    assert data.input_ids[0] == tokenize_examples(ex, tok, 512).input_ids[0]


def test_prompt_longer_than_context_is_an_error(smol_tok, tmp_path):
    tok = smol_tok
    ex = _examples(tmp_path, [ALPACA, {"instruction": "many words " * 80, "output": "ok"}])
    with pytest.raises(DataError, match="leaves no room") as err:
        tokenize_examples(ex, tok, max_len=64)
    assert err.value.line == 2 and "--max-len" in str(err.value)


def test_collate_pads_right_and_masks(smol_tok, tmp_path):
    tok = smol_tok
    data = tokenize_examples(_examples(tmp_path, [ALPACA, {"instruction": "x " * 30, "output": "y"}]), tok, 512)
    a, b = data[0], data[1]
    batch = data.collate([a, b])
    n = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n)
    short = 0 if len(a["input_ids"]) < n else 1
    m = len(data[short]["input_ids"])
    assert batch["attention_mask"][short].tolist() == [1] * m + [0] * (n - m)
    assert (batch["labels"][short, m:] == -100).all()
    assert (batch["input_ids"][short, m:] == data.pad_token_id).all()
    assert batch["labels"][short, :m].tolist() == data[short]["labels"]


def test_packing_keeps_examples_and_isolates_them(smollm2, tmp_path):
    model, tok = smollm2
    rows = [ALPACA, {"instruction": "Q?", "output": "A."}, {"instruction": "Spell cat.", "output": "c-a-t"},
            {"instruction": "Count to three.", "output": "one two three"}]
    ex = _examples(tmp_path, rows)
    plain = tokenize_examples(ex, tok, 512)
    longest = max(len(x) for x in plain.input_ids)
    packed = tokenize_examples(ex, tok, max_len=2 * longest + 1, pack=True)
    assert packed.packed and len(packed) < len(plain) and packed.n_examples == 4
    assert all(len(x) <= 2 * longest + 1 for x in packed.input_ids)
    # splitting rows where positions restart gives back exactly the unpacked examples
    pieces = []
    for ids, labels, pos in zip(packed.input_ids, packed.labels, packed.position_ids):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        pieces += [(ids[s:e], labels[s:e]) for s, e in zip(starts, starts[1:])]
    assert sorted(pieces) == sorted(zip(plain.input_ids, plain.labels))
    # each packed example sees only itself: hidden states equal those of the example run alone
    batch = packed.collate([packed[0]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state[0]
        pos = packed.position_ids[0]
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        assert len(starts) > 2, "the first packed row should hold two examples"
        for s, e in zip(starts, starts[1:]):
            alone = model.model(input_ids=torch.tensor([packed.input_ids[0][s:e]])).last_hidden_state[0]
            torch.testing.assert_close(hidden[s:e], alone, atol=1e-4, rtol=1e-4)


def test_collate_packed_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
                     {"input_ids": [8], "labels": [8], "position_ids": [0]}], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]


def test_tokenize_empty_and_bad_max_len(smol_tok, tmp_path):
    tok = smol_tok
    no_template = copy.copy(tok)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_examples(_examples(tmp_path, [ALPACA]), no_template, 128)
    with pytest.raises(DataError, match="no examples"):
        tokenize_examples([], tok, 128)
    with pytest.raises(ValueError, match="max_len"):
        tokenize_examples(_examples(tmp_path, [ALPACA]), tok, 1)
