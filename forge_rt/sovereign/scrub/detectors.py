"""Detectors for secrets and personal data.

Each detector is a function ``find(text) -> iterator of (start, end)`` spans of the sensitive value.
The list ``DETECTORS`` is ordered by priority: when spans of two detectors overlap, the earlier
(more specific) detector wins. Checksums come from python-stdnum so we never guess at the maths.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
from collections import Counter
from typing import Callable, Iterator

from forge_rt.core.errors import require_extra

with require_extra("train", "PII scrubbing (forge_rt.sovereign.scrub)"):
    from stdnum import iban, luhn
    from stdnum.br import cpf
    from stdnum.cn import ric
    from stdnum.es import dni, nie
    from stdnum.fi import hetu
    from stdnum.in_ import aadhaar
    from stdnum.it import codicefiscale
    from stdnum.se import personnummer
    from stdnum.us import ssn

Span = tuple[int, int]
Finder = Callable[[str], Iterator[Span]]


def _regex(pattern: str, group: int = 0, valid: Callable[[str], bool] | None = None) -> Finder:
    rx = re.compile(pattern)

    def find(text: str) -> Iterator[Span]:
        for m in rx.finditer(text):
            if valid is None or valid(m.group(group)):
                yield m.span(group)
    return find


def _chain(*finders: Finder) -> Finder:
    def find(text: str) -> Iterator[Span]:
        for f in finders:
            yield from f(text)
    return find


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


# --- PEM / JWT / URL credentials -------------------------------------------------------------
_PEM_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----")
# Body of a block: base64, whitespace, or the literal "\\n" that JSON-embedded keys (GCP files) carry.
_PEM_BODY = re.compile(r"(?:\\n|[A-Za-z0-9+/=\s])*")


def _pem(text: str) -> Iterator[Span]:
    pos = 0
    while (m := _PEM_BEGIN.search(text, pos)) is not None:
        end = text.find(f"-----END {m.group(1)}-----", m.end())
        if end >= 0:
            stop = end + len(m.group(1)) + 14
        else:   # cut off before its END line: mask the header and the body that follows it
            stop = m.end() + len(_PEM_BODY.match(text, m.end()).group(0).rstrip())
        yield m.start(), stop
        pos = stop


def _jwt_header_ok(token: str) -> bool:
    head = token.split(".", 1)[0]
    try:
        obj = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and ("alg" in obj or "typ" in obj)


_jwt = _regex(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}(?![\w-])",
              valid=_jwt_header_ok)
# Mask only user:password; the host stays readable.
_url_creds = _regex(r"\b[A-Za-z][A-Za-z0-9+.-]*://([^\s:/?#@]+:[^\s/?#@]+)@[^\s/?#]+", group=1)

# --- cloud and service credentials ---------------------------------------------------------
_aws_key_id = _regex(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA)[A-Z0-9]{16}(?![A-Z0-9])")
_aws_secret = _regex(r"(?i:aws_?secret_?access_?key|secret_?access_?key|aws_?secret(?:_?key)?)[\"']?\s*[:=]\s*[\"']?"
                     r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])", group=1)
_gcp = _chain(
    _regex(r"\"private_key_id\"\s*:\s*\"([0-9a-f]{40})\"", group=1),
    _regex(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])"),
)
_github = _regex(r"(?<![\w])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{50,255})(?![\w])")
_gitlab = _regex(r"(?<![\w-])gl(?:pat|dt|rt|ptt|oas|cbt|imt)-[0-9A-Za-z_-]{20,}(?![\w-])")
_slack = _chain(
    _regex(r"(?<![\w-])xox[abposre]-[0-9A-Za-z-]{10,}(?![\w-])"),
    _regex(r"(?<![\w-])xapp-\d-[0-9A-Za-z-]{10,}(?![\w-])"),
    _regex(r"https://hooks\.slack\.com/services/T[0-9A-Z]{6,}/B[0-9A-Z]{6,}/[0-9A-Za-z]{16,}"),
)
_stripe = _regex(r"(?<![\w])(?:(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}|whsec_[0-9A-Za-z]{24,})(?![\w])")

# --- personal data ---------------------------------------------------------------------------
_email = _regex(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                r"[A-Za-z]{2,24}(?![\w-])(?!:[\w.~-]+/)")   # not scp-style "git@host:org/repo"


def _iban(text: str) -> Iterator[Span]:
    # The greedy pattern may swallow a following all-caps word; shrink group by group until valid.
    for m in re.finditer(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])", text):
        cand = m.group(0)
        while len(cand) >= 15:
            if iban.is_valid(cand):
                yield m.start(), m.start() + len(cand)
                break
            cand = re.sub(r" ?[A-Z0-9]{1,4}$", "", cand)


_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3(?:0[0-5]|[689])|35|6)")


def _card_ok(s: str) -> bool:
    d = _digits(s)
    return 13 <= len(d) <= 19 and bool(_CARD_PREFIX.match(d)) and luhn.is_valid(d)


# One separator style per number (all spaces, all dashes or none) so that lists of numbers don't merge;
# a match must start a digit run (not after "DE00 ", which makes it part of an IBAN-shaped string).
_card = _regex(r"(?<!\d)(?<!\d[ .,-])(?:\d{4}(?: \d{4}){2,3}(?: \d{1,4})?|\d{4}(?:-\d{4}){2,3}(?:-\d{1,4})?"
               r"|\d{4}[ -]\d{6}[ -]\d{4,5}|\d{13,19})(?!\d|[.,-]\d)", valid=_card_ok)
_ssn = _chain(
    _regex(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])", valid=ssn.is_valid),
    _regex(r"(?i:\bssn|social security(?: number| no\.?)?)\W{1,4}(\d{9}|\d{3} \d{2} \d{4})(?!\d)", group=1,
           valid=ssn.is_valid),
)
_national_id = _chain(
    _regex(r"(?<![\w-])\d{8}-?[A-Z](?![\w-])", valid=dni.is_valid),                          # ES DNI
    _regex(r"(?<![\w-])[XYZ]-?\d{7}-?[A-Z](?![\w-])", valid=nie.is_valid),                    # ES NIE
    _regex(r"(?<![\d.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\d-])", valid=cpf.is_valid),            # BR CPF
    _regex(r"(?<![\w-])\d{6}[-+A-FU-Y]\d{3}[0-9A-Y](?![\w-])", valid=hetu.is_valid),         # FI HETU
    _regex(r"(?<![\w-])(?:\d{2})?\d{6}[-+]\d{4}(?![\w-])", valid=personnummer.is_valid),     # SE personnummer
    _regex(r"(?<![\w])\d{17}[\dX](?![\w])", valid=ric.is_valid),                              # CN resident ID
    _regex(r"(?<!\d)(?<!\d )[2-9]\d{3} \d{4} \d{4}(?!\d| \d)", valid=aadhaar.is_valid),          # IN Aadhaar
    _regex(r"(?<![\w])[A-Z]{6}\d{2}[A-EHLMPRST]\d{2}[A-Z]\d{3}[A-Z](?![\w])", valid=codicefiscale.is_valid),  # IT CF
)


def _phone_ok(s: str) -> bool:
    d = _digits(s)
    if s.startswith("00"):
        d = d[2:]
    return 7 <= len(d) <= 15


_phone = _chain(
    # International: +CC or 00CC, optional (area), groups separated by space/dot/dash.
    _regex(r"(?<![\w+])(?:\+|00)[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}(?![\d.]\d|\d)",
           valid=lambda s: 8 <= len(_digits(s)) - (2 if s.startswith("00") else 0) <= 15),
    # North American national forms: (415) 555-2671, 415-555-2671, 415.555.2671
    _regex(r"(?<![\w(.-])(?:\(\d{3}\) ?|\d{3}[-.])\d{3}[-.]\d{4}(?![\w-]|\.\d)"),
    # Any number introduced by a phone keyword.
    _regex(r"(?i:\b(?:phone|tel|telephone|mobile|cell|fax|call me at|whatsapp)\b)\.?:?\s*([+(]?\d[\d ().-]{5,}\d)",
           group=1, valid=_phone_ok),
)

_mac = _regex(r"(?<![\w:-])[0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}(?![\w:-])"
              r"|(?<![\w.])[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}(?!\w|\.\w)")


def _ipv6(text: str) -> Iterator[Span]:
    for m in re.finditer(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?"
                         r"(?:%[\w.]+)?(?![\w:])", text):
        cand = m.group(0)
        groups = [g for g in re.split(r"[:%]", cand.split("%")[0]) if g]
        if len(groups) < 3:   # "ab::cd" is valid IPv6 but far more often C++ or prose
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        yield m.span()


# Four dotted numbers preceded by these words are version/section numbers, not addresses.
_VERSION_CONTEXT = re.compile(r"(?i)(?:\bv|version|release|build|section|§|rule|chapter|firmware|ver\.?)\s*$")


def _ipv4(text: str) -> Iterator[Span]:
    for m in re.finditer(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?:/\d{1,2})?(?![\w]|\.\d)", text):
        addr = m.group(0).split("/")[0]
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            continue
        if _VERSION_CONTEXT.search(text[max(0, m.start() - 12):m.start()]):
            continue
        yield m.span()


# --- generic key=value secrets and high-entropy tokens ---------------------------------------
_PLACEHOLDER_VALUES = {"none", "null", "nil", "true", "false", "undefined", "redacted", "hidden", "required",
                       "optional", "string", "str", "your_password", "your-password", "your_api_key", "xxx"}


def _secret_value_ok(v: str) -> bool:
    low = v.lower().strip("'\"")
    if low in _PLACEHOLDER_VALUES or not low:
        return False
    if low[0] in "$<{%[(" or "(" in low or low.startswith(("os.", "env", "process.", "self.", "config.")):
        return False  # variables, templates and function calls, not literal secrets
    return set(low) - set("*x•.-_") != set()


_SECRET_KEYS = (r"api[_-]?key|apikey|x-api-key|api[_-]?secret|client[_-]?secret|secret[_-]?key|app[_-]?secret"
                r"|password|passwd|pwd|passphrase|db[_-]?pass|(?:access|auth|bearer|refresh|session|api)[_-]?token"
                r"|private[_-]?key")
_secret = _chain(
    _regex(r"(?i)(?<![A-Za-z0-9])(?:\w+[_-])?(?:" + _SECRET_KEYS + r")\b[\"']?\s*(?:[:=]|=>|:=)\s*[\"']?([^\s\"',;}]{3,})",
           group=1, valid=_secret_value_ok),
    _regex(r"(?i)\bauthorization\b[\"']?\s*[:=]\s*[\"']?(?:bearer|basic|token)\s+([A-Za-z0-9._~+/=-]{8,})", group=1),
)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _high_entropy_ok(tok: str) -> bool:
    body = tok.rstrip("=")
    if len(body) < 20 or re.fullmatch(r"[0-9a-fA-F-]+", body):   # hex digests and UUIDs are not secrets
        return False
    if not (re.search(r"[a-z]", body) and re.search(r"[A-Z]", body) and re.search(r"\d", body)):
        return False
    if "/" in body and re.fullmatch(r"[\w./-]+", body) and body.count("/") >= 2 and len(max(body.split("/"), key=len)) < 16:
        return False  # a path, not base64
    # Identifiers (Win32_NetworkAdapterConfiguration, MAX_RETRY_COUNT_V2) are mostly pronounceable words;
    # random base62 of 24+ chars is that word-like under 1.5% of the time.
    words = re.findall(r"[A-Z]?[a-z]{3,}|[A-Z]{3,}", body)
    if sum(len(w) for w in words if re.search(r"[aeiouyAEIOUY]", w)) >= 0.6 * len(body):
        return False
    # Random base62 has ~5.95 bits/char; we need headroom for short tokens whose entropy is capped by log2(len).
    return _entropy(body) >= min(4.2, 0.8 * math.log2(len(body)))


_high_entropy = _regex(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{20,}={0,2}(?![A-Za-z0-9+/_=-])", valid=_high_entropy_ok)


# (type, finder, triggers): a detector runs only if one of its lower-case trigger substrings occurs in
# the lower-cased text (None: always). Cheap `in` tests skip most regex passes on ordinary rows.
_DIGITS = tuple("0123456789")
DETECTORS: list[tuple[str, Finder, tuple[str, ...] | None]] = [
    ("PRIVATE_KEY", _pem, ("private key",)),
    ("JWT", _jwt, ("eyj",)),
    ("GCP_KEY", _gcp, ("private_key_id", "aiza")),
    ("AWS_ACCESS_KEY", _aws_key_id, ("akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva", "apka", "aroa")),
    ("AWS_SECRET_KEY", _aws_secret, ("secret",)),
    ("GITHUB_TOKEN", _github, ("gh", "github_pat_")),
    ("GITLAB_TOKEN", _gitlab, ("gl",)),
    ("SLACK_TOKEN", _slack, ("xox", "xapp-", "hooks.slack.com")),
    ("STRIPE_KEY", _stripe, ("_live_", "_test_", "whsec_")),
    ("URL_CREDENTIALS", _url_creds, ("://",)),
    ("EMAIL", _email, ("@",)),
    ("IBAN", _iban, _DIGITS),
    ("NATIONAL_ID", _national_id, _DIGITS),
    ("CREDIT_CARD", _card, _DIGITS),
    ("US_SSN", _ssn, ("-", "ssn", "social security")),
    ("PHONE", _phone, _DIGITS),
    ("MAC", _mac, (":", "-", ".")),
    ("IPV6", _ipv6, ("::", ":")),
    ("IPV4", _ipv4, (".",)),
    ("SECRET", _secret, ("key", "secret", "pass", "pwd", "token", "authorization")),
    ("HIGH_ENTROPY", _high_entropy, _DIGITS),
]
TYPES = tuple(d[0] for d in DETECTORS)
