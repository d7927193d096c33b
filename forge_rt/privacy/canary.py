"""Canaries for the "secret sharer" audit: random secret-shaped strings in formats the scrubber recognises
(an e-mail address, a card number) and in formats it cannot (a 9-digit access code, a random lowercase
passphrase), inserted at several repetition counts into a copy of the training rows.

Each canary is a chat exchange: a prompt naming it ("What did the copper note say?", a distinct noun per
canary, so canaries do not share a context) and a response `prefix + secret + suffix` ("my access code is
382910476"). The audit later ranks the secret against random candidates of the same format in that
context (audit.py). Secrets come from a seeded random.Random: they are fake, and are kept in the run so
the audit can be repeated."""
from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass

from forge_rt.privacy.errors import DPError

REPEATS = (1, 4, 16)


def _digits(n: int):
    return lambda rng: "".join(rng.choice(string.digits) for _ in range(n))


def _letters(n: int):
    return lambda rng: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _card(rng: random.Random) -> str:
    """A Visa-shaped 16-digit number whose last digit is its Luhn check digit (what the scrubber checks)."""
    from stdnum import luhn  # the train extra's checksum library, as the scrubber's detectors use
    body = "4" + _digits(14)(rng)
    return body + luhn.calc_check_digit(body)


@dataclass(frozen=True)
class CanaryFormat:
    name: str
    prefix: str
    suffix: str
    scrubbable: bool     # whether forge_rt.sovereign.scrub finds the whole prefix + secret + suffix's secret
    space: float         # how many secrets the format has (for the report)

    def secret(self, rng: random.Random) -> str:
        return _MAKERS[self.name](rng)

    def text(self, secret: str) -> str:
        return self.prefix + secret + self.suffix


_MAKERS = {"email": _letters(8), "card": _card, "access_code": _digits(9), "passphrase": _letters(10)}
FORMATS = {
    "email": CanaryFormat("email", "you can reach me at ", "@mailbox.org", True, 26.0 ** 8),
    "card": CanaryFormat("card", "my card number is ", "", True, 1e14),
    "access_code": CanaryFormat("access_code", "my access code is ", "", False, 1e9),
    "passphrase": CanaryFormat("passphrase", "the vault passphrase is ", "", False, 26.0 ** 10),
}
_NOUNS = ("copper", "harbor", "maple", "lantern", "granite", "willow", "falcon", "meadow", "saffron", "glacier",
          "orchid", "canyon", "juniper", "pebble", "thistle", "beacon", "cobalt", "ember", "fjord", "hazel",
          "indigo", "jasper", "kestrel", "lagoon")


@dataclass(frozen=True)
class Canary:
    format: str
    secret: str
    repeats: int
    noun: str

    @property
    def fmt(self) -> CanaryFormat:
        return FORMATS[self.format]

    @property
    def prompt(self) -> str:
        return f"What did the {self.noun} note say?"

    @property
    def text(self) -> str:
        return self.fmt.text(self.secret)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.text}]

    def to_dict(self) -> dict:
        return asdict(self)


def make_canaries(seed: int, formats=tuple(FORMATS), repeats=REPEATS, per_cell: int = 1) -> list[Canary]:
    """per_cell canaries of each format at each repetition count, with distinct secrets and prompts."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise DPError(f"canary formats {unknown}: use some of {', '.join(FORMATS)}")
    cells = [(f, r) for f in formats for r in repeats for _ in range(per_cell)]
    if len(cells) > len(_NOUNS):
        raise DPError(f"{len(cells)} canaries asked; at most {len(_NOUNS)} (fewer formats, counts or per cell)")
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for (f, r), noun in zip(cells, _NOUNS):
        s = FORMATS[f].secret(rng)
        while s in seen:
            s = FORMATS[f].secret(rng)
        seen.add(s)
        out.append(Canary(f, s, r, noun))
    return out


def insert_canaries(rows: list, canaries: list[Canary], make_row, seed: int) -> list:
    """A shuffled copy of `rows` with `repeats` copies of each canary's row (make_row(canary) builds one in
    the dataset's own form); `rows` itself is left as it was."""
    out = list(rows) + [make_row(c) for c in canaries for _ in range(c.repeats)]
    random.Random(seed).shuffle(out)
    return out


def candidates(canary: Canary, n: int, seed: int, exclude=()) -> list[str]:
    """n distinct random secrets of the canary's format, none equal to it or to any in `exclude`; the
    same (canary, n, seed) always gives the same list, so base and tuned models face the same candidates."""
    rng = random.Random(f"{seed}:{canary.format}:{canary.noun}")
    taken = {canary.secret, *exclude}
    out: list[str] = []
    while len(out) < n:
        s = canary.fmt.secret(rng)
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out
