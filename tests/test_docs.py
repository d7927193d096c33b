"""README.md, docs/*.md and bench/results/NOTES.md against their records.

A measured figure is written as a link to the record it comes from, the link's title saying where in the
JSON each number is: `[6.91 GiB](bench/results/bench_7b.json "train.peak_rss_bytes:GiB")`. In a table row,
every number of the row's cells after the first (code spans and the record links themselves left out) is
matched, in order, with the terms of the row's record links; in prose, the numbers of a record link's own
text are. Each must equal its term within the rounding shown. A measured figure (a number with a unit, or a
bare decimal) that no record link covers fails in README and docs/; versions and settings go in code spans.

Term: `path[:unit]` or `path / path[:unit]` (a ratio); `path` is dotted keys, `[3]` list items, `[1:]`
slices, `[key=value&key=value]` the one dict of a list that matches, optionally wrapped in median(), mean(),
min(), max(), or followed by `~word` to read the number after `word` in a printed line; several terms are
separated by `;`. Units: GiB and MiB (from bytes), `min` (from seconds), `%` (x 100), `change%`
((x - 1) x 100)."""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTES = ROOT / "bench" / "results" / "NOTES.md"
GENERATED = re.compile(r"<!-- forge_rt\.bench:begin.*?<!-- forge_rt\.bench:end -->", re.S)
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)(?:\s+\"([^\"]*)\")?\)")
CODE = re.compile(r"`[^`]*`")
NUMBER = re.compile(r"(?<![\w.])([-+\u2212]?)(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?=x(?!\w)|[^\w.]|\.(?!\d)|$)")
UNIT = r"(?:\s?(?:s|ms|µs|min|GiB|MiB|KiB|GB/s|MB/s|GB|MB|tokens/s|%)|x)(?![\w/])"
MEASURED = re.compile(r"(?<![\w.])(?:\d+(?:\.\d+)?" + UNIT + r"|\d+\.\d+(?![\w.]))")  # with a unit, or a bare decimal
SCALE = {"GiB": 2.0 ** -30, "MiB": 2.0 ** -20, "%": 100.0, "min": 1 / 60}
FUNCS = {"median": statistics.median, "mean": statistics.fmean, "min": min, "max": max}


def _walk(value, path: str):
    for key, index in re.findall(r"([^.\[\]]+)|\[([^\]]*)\]", path):
        if key:
            value = value[key]
        elif re.fullmatch(r"-?\d+", index):
            value = value[int(index)]
        elif re.fullmatch(r"-?\d*:-?\d*", index):
            a, b = (int(x) if x else None for x in index.split(":"))
            value = value[a:b]
        else:
            want = dict(kv.split("=", 1) for kv in index.split("&"))
            hits = [v for v in value if all(str(v.get(k)) == w for k, w in want.items())]
            assert len(hits) == 1, f"[{index}] matches {len(hits)} items, not one"
            value = hits[0]
    return value


def _operand(rec, text: str) -> float:
    m = re.fullmatch(r"(\w+)\((.*)\)", text.strip())
    if m and m.group(1) in FUNCS:
        return float(FUNCS[m.group(1)](_walk(rec, m.group(2))))
    path, _, word = text.strip().partition("~")
    value = _walk(rec, path)
    if word:  # a figure inside a printed line: `printed~score` reads "score 46.9" out of the string
        value = float(re.search(rf"\b{re.escape(word)}\s+(-?\d+(?:\.\d+)?)", value).group(1))
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{text!r} is {value!r}, not a number"
    return float(value)


def evaluate(rec, term: str) -> float:
    """One term of a record link's title, evaluated against the loaded record."""
    term, _, unit = term.strip().rpartition(":") if re.search(r":[A-Za-z%]+\s*$", term) else (term, "", "")
    parts = term.split(" / ")
    value = _operand(rec, parts[0]) / _operand(rec, parts[1]) if len(parts) == 2 else _operand(rec, parts[0])
    if unit == "change%":
        return (value - 1) * 100
    return value * SCALE[unit] if unit else value


def numbers(text: str) -> list[tuple[float, float, str]]:
    """(value, half a unit of the last digit shown, text) of every number in `text`."""
    out = []
    for sign, digits in NUMBER.findall(text):
        mantissa, _, exponent = digits.partition("e")
        decimals = len(mantissa.partition(".")[2]) - int(exponent or 0)
        value = float(digits) * (-1 if sign in "-\u2212" and sign else 1)
        out.append((value, 0.5 * 10.0 ** -decimals, sign + digits))
    return out


def record_links(text: str, page: Path) -> list[tuple[str, Path, str]]:
    return [(t, (page.parent / target.split("#")[0]), title) for t, target, title in LINK.findall(text)
            if target.endswith(".json") and title]


def _check(shown, links, where: str) -> list[str]:
    terms = [(path, term) for _, path, spec in links for term in spec.split(";") if term.strip()]
    if len(shown) != len(terms):
        return [f"{where}: {len(shown)} numbers {[s[2] for s in shown]} but {len(terms)} record terms"]
    errors = []
    for (value, tol, txt), (path, term) in zip(shown, terms):
        try:
            want = evaluate(json.loads(path.read_text()), term)
        except (AssertionError, KeyError, IndexError, TypeError, ValueError, OSError) as exc:
            errors.append(f"{where}: {path.name} {term!r}: {type(exc).__name__}: {exc}")
            continue
        if not math.isclose(value, want, abs_tol=tol * 1.0001, rel_tol=1e-9):
            errors.append(f"{where}: shows {txt}, {path.name} {term!r} gives {want:.6g}")
    return errors


def _strip(text: str) -> str:
    """Code spans out; links reduced to their text."""
    return LINK.sub(lambda m: m.group(1), CODE.sub("", text))


def _table_rows(text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            yield n, [c for c in line.strip().strip("|").split("|")]


def check_page(page: Path, strict: bool) -> list[str]:
    """Every record-linked figure of `page` against its record; with `strict`, also that no measured
    figure goes without one."""
    text = GENERATED.sub("", page.read_text())
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    errors = []
    for n, cells in _table_rows(text):
        where = f"{page.name}:{n}"
        rest = "|".join(cells[1:])
        links = record_links(rest, page)
        if links:
            bare = LINK.sub(lambda m: "" if m.group(2).endswith(".json") and m.group(3) else m.group(1),
                            CODE.sub("", rest))
            errors += _check(numbers(bare), links, where)
        elif strict and MEASURED.search(_strip(rest)):
            errors.append(f"{where}: measured figure with no record link: {MEASURED.search(_strip(rest)).group(0)!r}")
    prose = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
    for n, para in enumerate(re.split(r"\n\s*\n", prose)):
        for txt, path, spec in record_links(para, page):
            errors += _check(numbers(CODE.sub("", txt)), [(txt, path, spec)], f"{page.name} ({txt!r})")
        if strict:
            left = LINK.sub(lambda m: "" if m.group(2).endswith(".json") and m.group(3) else m.group(1),
                            CODE.sub("", para))
            errors += [f"{page.name}: measured figure with no record link: {m.group(0)!r} in "
                       f"{para.strip()[:80]!r}" for m in MEASURED.finditer(left)]
    return errors


@pytest.mark.parametrize("page", PAGES + [NOTES], ids=lambda p: p.name)
def test_figures_equal_their_records(page):
    assert page.exists()
    assert check_page(page, strict=page != NOTES) == []


@pytest.mark.parametrize("page", PAGES + [NOTES], ids=lambda p: p.name)
def test_every_linked_file_exists(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    missing = [target for _, target, _ in LINK.findall(text)
               if not re.match(r"[a-z]+:|#", target) and not (page.parent / target.split("#")[0]).exists()]
    # repository paths named in code spans (tests, scripts) move with refactors: they must still be there
    named = re.findall(r"`((?:tests|bench|tools|docs|forge_rt|csrc|\.ci)/[\w./-]*)`", text)
    missing += [path for path in named if not (ROOT / path).exists()]
    assert missing == []


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    for topic in ("export", "memory", "distributed", "sovereign"):
        assert (ROOT / "docs" / f"{topic}.md").exists()
        assert f"(docs/{topic}.md)" in readme


def test_readme_gives_exactly_the_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## The two commands\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README has no '## The two commands' section"
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", section.group(1), re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.strip()]
    assert commands == ["bash tools/setup.sh && .venv/bin/python -m forge_rt.train", "bash .ci/run"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'bash "$repo/tools/setup.sh"' in ci and re.search(r"-m pytest .*\"\$repo/tests\"", ci)
    assert "python -m forge_rt.train" not in ci  # the test command is not the default job


def test_readme_and_docs_hold_no_history():
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"\bround \d|\bsession\b", text, re.I), page.name
        assert not re.search(r"(?<![\w/.])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w])", text), page.name
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


def test_checker_sees_a_changed_number(tmp_path):
    """The check itself: a figure moved by one in its last digit, or a term pointing elsewhere, fails."""
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"a": {"b": 7415717888, "t": [155.0, 171.4, 156.5]}, "p": "score 46.9  n 200",
                               "rows": [{"case": "x y: z", "v": 0.3229}], "e": 4.48e-7}))
    good = ('| what | a | b |\n|---|---|---|\n'
            '| peak | 6.91 GiB, median 156.5 s | 0.323x [r](r.json "a.b:GiB; median(a.t); rows[case=x y: z].v") |\n\n'
            'Prose: [6.91 GiB](r.json "a.b:GiB") and [+32.3%](r.json "rows[0].v:%"), [46.9 and 4.5e-7](r.json "p~score; e").\n')
    page = tmp_path / "p.md"
    for text, ok in ((good, True), (good.replace("6.91 GiB,", "6.92 GiB,"), False),
                     (good.replace("[6.91 GiB](", "[6.81 GiB]("), False), (good.replace("0.323x", "0.32x"), True),
                     (good.replace("0.323x", "0.33x"), False), (good.replace("median(a.t)", "max(a.t)"), False),
                     (good.replace("Prose:", "Prose: 1.5 s,"), False), (good.replace("z].v", "q].v"), False),
                     (good.replace("4.5e-7", "4.6e-7"), False), (good.replace("46.9 and", "46.8 and"), False),
                     (good + "| score | 44.45 |\n", False), (good + "| `bitsandbytes 0.50` | NF4 |\n", True)):
        page.write_text(text)
        assert (check_page(page, strict=True) == []) is ok, (text, check_page(page, strict=True))
