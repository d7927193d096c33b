"""Writes tests/sovereign/data/ner_corpus.jsonl: log-like lines labelled with the people, organisations
and places in them (`labels`: NAME, ORG, LOCATION character spans), for the NER scrubbing tests.

Lines mix real entities with near-misses that must stay readable: equipment codes (P-3, ACME-500),
unit names that look like places or companies (North Station, Riverside Plant, Eastfield Substation),
shift and crew codes, each recorded in `near_misses` (EQUIPMENT, UNIT, SHIFT spans) so a test can say
which kind the model mistakes. About a third of the rows hold only near-misses (no labels). Deterministic:
re-running gives the same file.  Run: python tests/sovereign/data/make_ner_corpus.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

R = random.Random(20260512)
FIRST = ["John", "Maria", "Wei", "Priya", "Olusegun", "Anna", "Mohammed", "Sofia", "Kenji", "Fatima", "Lars",
         "Carlos", "Ingrid", "Tomasz", "Aisha", "David", "Elena", "Raj", "Mei", "Patrick", "Hannah", "Diego"]
LAST = ["Miller", "Garcia", "Zhang", "Patel", "Okafor", "Kowalski", "Haddad", "Rossi", "Tanaka", "Nilsson",
        "O'Brien", "Schmidt", "Novak", "Fernandes", "Johansson", "Murphy", "Nguyen", "Dubois", "Khan", "Anderson"]
ORGS = ["Siemens Energy", "Halliburton", "Acme Corp", "Northwind Logistics", "General Electric", "Shell",
        "Schneider Electric", "Caterpillar Inc.", "Honeywell", "Veolia", "Bechtel", "Maersk", "Baker Hughes",
        "Emerson Electric", "ABB", "Chevron", "Fluor Corporation", "Vestas Wind Systems", "Yokogawa", "Bosch"]
PLACES = ["Houston", "Rotterdam", "Berlin", "Texas", "Norway", "Aberdeen", "Singapore", "Calgary", "Ohio",
          "Brazil", "Hamburg", "Perth", "Denver", "Poland", "Osaka", "Lagos", "Chile", "Marseille", "Bavaria", "Alaska"]
# Near-misses: codes and unit names that an over-eager model reads as a name, company or place.
EQUIP = ["P-3", "ACME-500", "C-12", "V-101", "TX-4", "GEN-2", "HX-07", "K-9", "PLC-22", "MV-310", "FT-1A", "B-52B"]
UNITS = ["North Station", "Riverside Plant", "Eastfield Substation", "Harbor Unit", "West Yard", "Pine Ridge Depot",
         "South Tank Farm", "Lakeside Pump House", "Unit Alpha", "Bravo Line", "Kingston Bay", "Hill Top Reservoir"]
SHIFTS = ["B2", "shift C", "Night Shift 3", "crew D-4", "team Echo", "rotation 7B", "A-shift", "Red Crew"]
LEVEL = ["INFO", "WARN", "ERROR", "DEBUG"]


def stamp():
    return f"2025-{R.randint(1, 12):02d}-{R.randint(1, 28):02d} {R.randint(0, 23):02d}:{R.randint(0, 59):02d}"


def person():
    return f"{R.choice(FIRST)} {R.choice(LAST)}"


# "{P}" a person, "{O}" an organisation, "{L}" a place; "{E}", "{U}", "{S}" near-misses (not labelled).
WITH_ENTITIES = [
    "{T} {V} pump {E} tripped; {P} reset it at {U}",
    "{T} {V} shift {S}: {P} from {O} replaced the {E} valve",
    "{T} {V} {P} called {O} about {E} in {L}",
    "ticket #{N} assigned to {P} ({O}), site {U}",
    "{T} {V} {E} at {U} offline, escalated to {P}",
    "Handover {S}: {P} signed off, {P} on call until 06:00",
    "{T} {V} spare parts for {E} ordered from {O} ({L} warehouse)",
    "{T} {V} inspection of {U} by {P}, contractor {O}",
    "work order WO-{N}: {P} to check {E}; vendor {O} notified",
    "{T} {V} shipment from {L} delayed, {O} says Thursday",
    "note: {P} moved from {L} to the {U} team",
    "{T} {V} alarm on {E} acknowledged by {P} ({S})",
    "{O} technician {P} arrived on site at {U}",
    "{T} {V} {P} reports vibration on {E}, {S}",
    "Meeting with {O} in {L}: {P} and {P} attending",
]
NEAR_MISS_ONLY = [
    "{T} {V} pump {E} tripped at {U}, auto-restart ok",
    "{T} {V} {S} started; {E} and {E} running",
    "{T} {V} level low in {U}, {E} throttled to 40%",
    "ticket #{N}: {E} pressure alarm at {U}",
    "{T} {V} {U} switched to backup feed ({E})",
    "Handover {S}: no open issues at {U}",
    "work order WO-{N}: replace seal on {E}",
    "{T} {V} {E} -> {E} transfer complete, {U} idle",
    "{T} {V} {S} reports {U} nominal, {E} at 72 C",
    "inspection of {U} scheduled, {E} excluded",
]
LABEL = {"P": "NAME", "O": "ORG", "L": "LOCATION"}
NEAR = {"E": "EQUIPMENT", "U": "UNIT", "S": "SHIFT"}


def fill(template: str) -> dict:
    """Fills the slots left to right, recording the span of every labelled one."""
    text, pos, spans = "", 0, {"labels": [], "near_misses": []}
    while (i := template.find("{", pos)) >= 0:
        text += template[pos:i]
        slot = template[i + 1]
        value = {"P": person, "O": lambda: R.choice(ORGS), "L": lambda: R.choice(PLACES), "E": lambda: R.choice(EQUIP),
                 "U": lambda: R.choice(UNITS), "S": lambda: R.choice(SHIFTS), "T": stamp,
                 "V": lambda: R.choice(LEVEL), "N": lambda: str(R.randint(1000, 99999))}[slot]()
        kind = LABEL.get(slot) or NEAR.get(slot)
        if kind:
            spans["labels" if slot in LABEL else "near_misses"].append(
                {"type": kind, "start": len(text), "end": len(text) + len(value)})
        text += value
        pos = i + 3
    return {"text": text + template[pos:], **spans}


def main():
    rows = [fill(R.choice(WITH_ENTITIES)) for _ in range(130)] + [fill(R.choice(NEAR_MISS_ONLY)) for _ in range(70)]
    path = Path(__file__).with_name("ner_corpus.jsonl")
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    spans = [lab["type"] for r in rows for lab in r["labels"]]
    print(f"wrote {path}: {len(rows)} rows, {len(spans)} labelled spans "
          f"({', '.join(f'{t} {spans.count(t)}' for t in LABEL.values())})")


if __name__ == "__main__":
    main()
