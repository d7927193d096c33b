"""Generates the shipped demo task: triage of equipment telemetry at a remote site.

The rules in `triage()` define the right answer; everything else only samples readings so that each
fault code is well represented. Deterministic for a given seed:

    python tools/make_demo_data.py            # rewrites forge_rt/data/demo/train.jsonl and eval.jsonl
    python tools/make_demo_data.py --check    # fails if the shipped files differ from a regeneration

Rules, first match wins (SHUTDOWN rules before INSPECT rules):
    SHUTDOWN  SMOKE         the technician note mentions smoke or a burning smell
    SHUTDOWN  OVERHEAT      temperature >= 100 C
    SHUTDOWN  VIB_CRITICAL  vibration >= 10.0 mm/s
    INSPECT   TEMP_HIGH     temperature >= 85 C
    INSPECT   VIB_HIGH      vibration >= 6.0 mm/s
    INSPECT   LOW_PRESSURE  pressure < 2.5 bar
    INSPECT   LEAK          the technician note mentions a leak or drip
    INSPECT   TEMP_RISING   temperature trend rising and temperature >= 75 C
    NORMAL    NONE          otherwise
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "forge_rt" / "data" / "demo"
N_TRAIN = 623
N_EVAL = 200
SEED = 20261122

INSTRUCTION = ("Triage this site telemetry. Reply with JSON only: status (NORMAL, INSPECT or SHUTDOWN), "
               "fault_code, reason.")

EQUIPMENT = [("pump", "P"), ("compressor", "C"), ("generator", "G"), ("fan", "F"), ("conveyor motor", "M")]
TRENDS = ("steady", "rising", "falling")
NOTES_OK = (
    "routine check, nothing unusual", "filter replaced last week", "operator says it sounds normal",
    "area dusty after the storm", "bearing greased yesterday", "no remarks", "paint worn on the guard",
    "door seal checked, fine", "night shift reading", "running since the last restart",
)
NOTES_LEAK = ("small oil leak under the housing", "coolant dripping near the inlet",
              "fluid leak at the flange", "drip of oil on the floor below")
NOTES_SMOKE = ("smoke seen near the casing", "burning smell at the panel",
               "light smoke from the motor end", "operator noticed a burning smell")

# Limits used by the rules (and quoted in the reasons).
OVERHEAT_C, TEMP_HIGH_C, TEMP_RISING_C = 100, 85, 75
VIB_CRITICAL, VIB_HIGH = 10.0, 6.0
PRESSURE_MIN = 2.5


def triage(r: dict) -> dict:
    """The task's ground truth: the verdict for one set of readings."""
    note = r["note"].lower()
    t, v, p = r["temp"], r["vibration"], r["pressure"]
    rules = (
        ("smoke" in note or "burning" in note, "SHUTDOWN", "SMOKE", "technician reports smoke or burning"),
        (t >= OVERHEAT_C, "SHUTDOWN", "OVERHEAT", f"temperature {t} C at or above {OVERHEAT_C} C limit"),
        (v >= VIB_CRITICAL, "SHUTDOWN", "VIB_CRITICAL",
         f"vibration {v} mm/s at or above {VIB_CRITICAL} limit"),
        (t >= TEMP_HIGH_C, "INSPECT", "TEMP_HIGH", f"temperature {t} C at or above {TEMP_HIGH_C} C warning level"),
        (v >= VIB_HIGH, "INSPECT", "VIB_HIGH", f"vibration {v} mm/s at or above {VIB_HIGH} warning level"),
        (p < PRESSURE_MIN, "INSPECT", "LOW_PRESSURE", f"pressure {p} bar below {PRESSURE_MIN} bar minimum"),
        ("leak" in note or "drip" in note, "INSPECT", "LEAK", "technician reports a leak"),
        (r["trend"] == "rising" and t >= TEMP_RISING_C, "INSPECT", "TEMP_RISING",
         f"temperature {t} C and rising"),
    )
    for fired, status, code, reason in rules:
        if fired:
            return {"status": status, "fault_code": code, "reason": reason}
    return {"status": "NORMAL", "fault_code": "NONE", "reason": "all readings within limits"}


# Target code -> sampling weight. NONE is the most common, as on a real site.
TARGETS = {"NONE": 5, "SMOKE": 2, "OVERHEAT": 2, "VIB_CRITICAL": 2, "TEMP_HIGH": 2, "VIB_HIGH": 2,
           "LOW_PRESSURE": 2, "LEAK": 2, "TEMP_RISING": 2}


def _normal_readings(rng: random.Random) -> dict:
    kind, prefix = rng.choice(EQUIPMENT)
    trend = rng.choice(TRENDS)
    temp_hi = TEMP_RISING_C - 1 if trend == "rising" else TEMP_HIGH_C - 1
    return {
        "equipment": f"{kind} {prefix}-{rng.randint(1, 40):02d}",
        "temp": rng.randint(40, temp_hi),
        "trend": trend,
        "vibration": round(rng.uniform(0.5, VIB_HIGH - 0.1), 1),
        "pressure": round(rng.uniform(PRESSURE_MIN, 7.5), 1),
        "note": rng.choice(NOTES_OK),
    }


def _apply(code: str, r: dict, rng: random.Random) -> None:
    """Pushes the readings into the band that makes `code` fire."""
    if code == "SMOKE":
        r["note"] = rng.choice(NOTES_SMOKE)
    elif code == "OVERHEAT":
        r["temp"] = rng.randint(OVERHEAT_C, 125)
    elif code == "VIB_CRITICAL":
        r["vibration"] = round(rng.uniform(VIB_CRITICAL, 16.0), 1)
    elif code == "TEMP_HIGH":
        r["temp"] = rng.randint(TEMP_HIGH_C, OVERHEAT_C - 1)
    elif code == "VIB_HIGH":
        r["vibration"] = round(rng.uniform(VIB_HIGH, VIB_CRITICAL - 0.1), 1)
    elif code == "LOW_PRESSURE":
        r["pressure"] = round(rng.uniform(0.6, PRESSURE_MIN - 0.1), 1)
    elif code == "LEAK":
        r["note"] = rng.choice(NOTES_LEAK)
    elif code == "TEMP_RISING":
        r["trend"] = "rising"
        r["temp"] = rng.randint(TEMP_RISING_C, TEMP_HIGH_C - 1)


def sample(rng: random.Random) -> dict:
    """One set of readings. A quarter of the faulty ones carry a second, lower-priority fault, so the
    rule order matters."""
    codes = list(TARGETS)
    code = rng.choices(codes, weights=[TARGETS[c] for c in codes])[0]
    r = _normal_readings(rng)
    if code != "NONE" and rng.random() < 0.25:
        lower = codes[codes.index(code) + 1:]
        if lower:
            _apply(rng.choice(lower), r, rng)
    _apply(code, r, rng)
    return r


def render_input(r: dict) -> str:
    return (f"Equipment: {r['equipment']}\n"
            f"Temperature: {r['temp']} C, {r['trend']}\n"
            f"Vibration: {r['vibration']} mm/s\n"
            f"Pressure: {r['pressure']} bar\n"
            f"Note: {r['note']}")


def make_rows(n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        r = sample(rng)
        text = render_input(r)
        if text in seen:  # keeps eval held out from train, and rows unique
            continue
        seen.add(text)
        rows.append({"instruction": INSTRUCTION, "input": text, "output": json.dumps(triage(r))})
    return rows


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    train = make_rows(N_TRAIN, rng, seen)
    held_out = make_rows(N_EVAL, rng, seen)
    return train, held_out


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--check", action="store_true", help="verify the shipped files instead of writing")
    args = ap.parse_args(argv)
    train, held_out = generate(args.seed)
    files = {"train.jsonl": _dump(train), "eval.jsonl": _dump(held_out)}
    if args.check:
        stale = [n for n, text in files.items() if (args.out / n).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; rerun tools/make_demo_data.py", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(train)} train and {len(held_out)} eval examples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
