"""Writes tests/data/pii_corpus.jsonl: labeled snippets for the scrubber tests.

Positives carry synthetic values with valid checksums (made with python-stdnum's check-digit
functions); negatives are look-alikes that must not be flagged. Deterministic: re-running gives
the same file.  Run: python tests/data/make_pii_corpus.py
"""
from __future__ import annotations

import base64
import json
import random
import string
from pathlib import Path

from stdnum import iban, luhn, verhoeff
from stdnum.br import cpf
from stdnum.cn import ric
from stdnum.es import dni, nie
from stdnum.fi import hetu
from stdnum.it import codicefiscale
from stdnum.se import personnummer

R = random.Random(20261122)
B62 = string.ascii_letters + string.digits
FIRST = ["ana", "li.wei", "j.smith", "maria_garcia", "o.okafor", "priya", "t-nguyen", "kowalski", "sven", "fatima"]
DOMAINS = ["example.org", "mail.example.com", "corp.example.co.uk", "uni-example.edu", "example.io", "post.example.de"]
GENERIC = [
    "Please contact {v} about the invoice.",
    "{v}",
    "The value was {v} according to the log.",
    "User reported: my details are {v}, please update.",
    "- {v}\n- next item",
    "Note to self ({v}) before Monday",
    '{{"field": "{v}", "ok": true}}',
    "Q: what did they send? A: {v}.",
]


def rs(n, alphabet=B62):
    return "".join(R.choice(alphabet) for _ in range(n))


def digits(n):
    return "".join(R.choice(string.digits) for _ in range(n))


# ---------- positive value generators: each returns (value, list of type-specific templates)
def email():
    v = f"{R.choice(FIRST)}{R.choice(['', '+news', '2024', '.work'])}@{R.choice(DOMAINS)}"
    return v, ["Send the report to {v} by Friday.", "From: {v}", "cc {v}; bcc nobody", "<a href=\"mailto:{v}\">mail</a>"]


def phone():
    forms = [
        lambda: f"+44 20 {digits(4)} {digits(4)}",
        lambda: f"+1 ({R.randint(201, 989)}) {digits(3)}-{digits(4)}",
        lambda: f"+49 30 {digits(8)}",
        lambda: f"+33 {R.randint(1, 9)} {digits(2)} {digits(2)} {digits(2)} {digits(2)}",
        lambda: f"+91-{R.randint(70000, 99999)}-{digits(5)}",
        lambda: f"0049 89 {digits(7)}",
        lambda: f"+81 3-{digits(4)}-{digits(4)}",
        lambda: f"({R.randint(201, 989)}) {digits(3)}-{digits(4)}",
        lambda: f"{R.randint(201, 989)}-{digits(3)}-{digits(4)}",
        lambda: f"+61 4{digits(2)} {digits(3)} {digits(3)}",
        lambda: f"+5511{digits(9)}",
    ]
    return R.choice(forms)(), ["Call me at {v} after 6pm.", "Tel: {v}", "mobile {v} (whatsapp too)", "Phone number {v}"]


def ipv4():
    v = R.choice([f"192.168.{R.randint(0, 255)}.{R.randint(1, 254)}", f"10.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
                  f"{R.randint(11, 223)}.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}", f"172.16.{R.randint(0, 31)}.{R.randint(1, 254)}"])
    return v, ["Connection from {v} was refused.", "ssh root@{v}", "server={v}:8080", "GET /index.html from {v} status 200"]


def ipv6():
    g = [f"{R.randint(0, 65535):x}" for _ in range(8)]
    v = R.choice([":".join(g), f"2001:db8::{g[0]}:{g[1]}", f"fe80::{g[2]}:{g[3]}:{g[4]}%eth0", f"2a02:{g[1]}:{g[2]}::{g[5]}",
                  f"2001:0db8:{g[3]}:0000:0000:{g[4]}:{g[6]}:{g[7]}"])
    return v, ["client [{v}] connected", "The host resolves to {v} now.", "ip -6 addr add {v}/64 dev eth0"]


def mac():
    octs = [f"{R.randint(0, 255):02x}" for _ in range(6)]
    v = R.choice([":".join(octs).upper(), "-".join(octs), f"{octs[0]}{octs[1]}.{octs[2]}{octs[3]}.{octs[4]}{octs[5]}"])
    return v, ["Device MAC {v} joined the network.", "hwaddr={v}", "arp entry {v} at port 3"]


def card():
    pref, n = R.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16), ("3530", 16), ("36", 14)])
    body = pref + digits(n - len(pref) - 1)
    num = body + luhn.calc_check_digit(body)
    if n == 16:
        v = R.choice([" ".join(num[i:i + 4] for i in range(0, 16, 4)), "-".join(num[i:i + 4] for i in range(0, 16, 4)), num])
    elif n == 15:
        v = R.choice([f"{num[:4]} {num[4:10]} {num[10:]}", num])
    else:
        v = num
    return v, ["Card number: {v} exp 09/27", "charge {v} for the order", "my visa is {v}, cvv later"]


IBAN_FMT = {"DE": lambda: digits(18), "GB": lambda: "WEST" + digits(14), "NL": lambda: "ABNA" + digits(10),
            "FR": lambda: digits(23), "ES": lambda: digits(20), "IT": lambda: R.choice("ABCXYZ") + digits(22),
            "PL": lambda: digits(24), "AT": lambda: digits(16), "CH": lambda: digits(17), "BE": lambda: digits(12)}


def iban_value():
    cc = R.choice(sorted(IBAN_FMT))
    for _ in range(100000):
        bban = IBAN_FMT[cc]()
        num = cc + iban.calc_check_digits(cc + "00" + bban) + bban
        if iban.is_valid(num):
            break
    else:
        raise RuntimeError(cc)
    v = R.choice([num, " ".join(num[i:i + 4] for i in range(0, len(num), 4))])
    return v, ["IBAN: {v}", "Please wire the deposit to {v} (ref 55).", "Kontonummer {v}"]


def ssn():
    while True:
        v = f"{R.randint(1, 899):03d}-{R.randint(1, 99):02d}-{R.randint(1, 9999):04d}"
        if not v.startswith("666"):
            break
    return v, ["SSN: {v}", "social security number {v} on file", "Employee ssn {v}."]


def _reject(make, valid):
    while True:
        v = make()
        if valid(v):
            return v


def national_id():
    def date6():
        return f"{R.randint(1, 28):02d}{R.randint(1, 12):02d}{R.randint(50, 99):02d}"
    kind = R.choice(["dni", "nie", "cpf", "hetu", "se", "ric", "aadhaar", "cf"])
    if kind == "dni":
        b = digits(8)
        v = b + dni.calc_check_digit(b)
    elif kind == "nie":
        b = R.choice("XYZ") + digits(7)
        v = b + nie.calc_check_digit(b)
    elif kind == "cpf":
        v = _reject(lambda: f"{digits(3)}.{digits(3)}.{digits(3)}-{digits(2)}", cpf.is_valid)
    elif kind == "hetu":
        v = _reject(lambda: f"{date6()}-{R.randint(2, 899):03d}{R.choice('0123456789ABCDEFHJKLMNPRSTUVWXY')}", hetu.is_valid)
    elif kind == "se":
        b = f"{R.randint(50, 99):02d}{R.randint(1, 12):02d}{R.randint(1, 28):02d}{digits(3)}"
        v = f"{b[:6]}-{b[6:]}{luhn.calc_check_digit(b)}"
        assert personnummer.is_valid(v)
    elif kind == "ric":
        v = _reject(lambda: R.choice(["110105", "310104", "440305", "510107"]) + f"19{R.randint(50, 99)}{R.randint(1, 12):02d}"
                    f"{R.randint(1, 28):02d}" + digits(3) + R.choice("0123456789X"), ric.is_valid)
    elif kind == "aadhaar":
        b = str(R.randint(2, 9)) + digits(10)
        n = b + verhoeff.calc_check_digit(b)
        v = f"{n[:4]} {n[4:8]} {n[8:]}"
    else:
        up = string.ascii_uppercase
        b = (rs(6, up) + digits(2) + R.choice("ABCDEHLMPRST") + f"{R.randint(1, 28):02d}" + R.choice(up) + digits(3))
        v = b + codicefiscale.calc_check_digit(b)
    return v, ["ID document number {v}", "DNI/NIE/CPF: {v}", "identity no. {v} verified at the desk"]


def aws_key():
    return R.choice(["AKIA", "ASIA"]) + rs(16, string.ascii_uppercase + string.digits), \
        ["aws_access_key_id = {v}", "export AWS_ACCESS_KEY_ID={v}", '"AccessKeyId": "{v}"']


def aws_secret():
    v = rs(40, B62 + "/+")
    return v, ["aws_secret_access_key = {v}", "AWS_SECRET_ACCESS_KEY={v}", '"SecretAccessKey": "{v}"', "aws_secret: {v}"]


def gcp():
    if R.random() < 0.5:   # API key; context-free templates are fine for its AIza prefix
        return "AIza" + rs(35, B62 + "_-"), ["const key = \"{v}\";", "maps api key {v} in the html", "GOOGLE_API_KEY={v}"]
    # service-account key id: only recognizable inside its JSON field
    return rs(40, "0123456789abcdef"), ['{{"type": "service_account", "project_id": "demo", "private_key_id": "{v}"}}',
                                         '"private_key_id": "{v}",']


def github():
    v = R.choice([R.choice(["ghp_", "gho_", "ghs_", "ghu_", "ghr_"]) + rs(36), "github_pat_" + rs(22) + "_" + rs(59)])
    return v, ["git clone https://x:{v}@github.com/o/r", "GITHUB_TOKEN={v}", "token {v} leaked in CI log"]


def gitlab():
    return R.choice(["glpat-", "gldt-", "glrt-"]) + rs(20, B62 + "_-"), ["GITLAB_TOKEN={v}", "use {v} as the private token", "header PRIVATE-TOKEN: {v}"]


def slack():
    v = R.choice([f"xoxb-{digits(11)}-{digits(12)}-{rs(24)}", f"xoxp-{digits(11)}-{digits(11)}-{digits(12)}-{rs(32, '0123456789abcdef')}",
                  f"https://hooks.slack.com/services/T{rs(8, string.ascii_uppercase + string.digits)}/B{rs(10, string.ascii_uppercase + string.digits)}/{rs(24)}"])
    return v, ["SLACK_BOT_TOKEN={v}", "post to {v} when done", "slack: {v}"]


def stripe():
    return R.choice(["sk_live_", "sk_test_", "rk_live_"]) + rs(R.choice([24, 32, 99])), \
        ["stripe.api_key = \"{v}\"", "STRIPE_SECRET={v}", "Stripe key {v} rotated"]


def secret():
    key = R.choice(["password", "api_key", "apiKey", "client_secret", "DB_PASSWORD", "passwd", "auth_token", "secret_key", "pwd", "X-API-Key"])
    val = R.choice(["hunter2", "Tr0ub4dor&3", "correct-horse-battery", "S3cr3t!2024", rs(12), rs(20, string.ascii_lowercase + string.digits), "letmein99"])
    tmpl = R.choice(["{k}={v}", "{k}: {v}", '"{k}": "{v}"', "{k} = '{v}'", "--{k}={v}"])
    text = tmpl.format(k=key, v="{v}")
    if R.random() < 0.2:
        val, text = rs(R.choice([24, 40])), "Authorization: Bearer {v}"
    return val, [text, "config: " + text + " # prod", "set " + text + " then restart"]


def jwt():
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()
    v = ".".join([b64({"alg": R.choice(["HS256", "RS256"]), "typ": "JWT"}),
                  b64({"sub": digits(8), "name": R.choice(FIRST), "iat": R.randint(1600000000, 1800000000)}), rs(43, B62 + "_-")])
    return v, ["Authorization: JWT {v}", "token={v}", "the cookie held {v}"]


def pem():
    kind = R.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    body = "\n".join(rs(64, B62 + "+/") for _ in range(R.randint(2, 5)))
    v = f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----"
    if R.random() < 0.3:   # JSON-embedded with literal \n, as in GCP service-account files
        v = v.replace("\n", "\\n")
    return v, ["key file:\n{v}\n", "{v}", '"private_key": "{v}\\n",']


def url_creds():
    user = R.choice(["admin", "deploy", "root", "app_user", "ci"])
    pw = R.choice([rs(10), "p%40ss", "hunter2", rs(16, string.ascii_lowercase + string.digits)])
    host = R.choice(["db.internal:5432/app", "redis.example.com:6379", "ftp.example.org/pub", "10.0.0.5:27017/admin"])
    scheme = R.choice(["postgres", "mysql", "redis", "https", "ftp", "mongodb"])
    return f"{user}:{pw}", [scheme + "://{v}@" + host, "DATABASE_URL=" + scheme + "://{v}@" + host, "connect via " + scheme + "://{v}@" + host + " please"]


def high_entropy():
    v = R.choice([rs(R.randint(24, 48)), base64.b64encode(R.randbytes(R.choice([24, 30, 33]))).decode(), rs(32, B62 + "_-")])
    while not (any(c.isupper() for c in v) and any(c.islower() for c in v) and any(c.isdigit() for c in v)):
        v = rs(32)
    return v, ["session cookie {v}", "nonce: {v}", "the shared secret is {v} (do not share)"]


GENERATORS = {
    "EMAIL": email, "PHONE": phone, "IPV4": ipv4, "IPV6": ipv6, "MAC": mac, "CREDIT_CARD": card, "IBAN": iban_value,
    "US_SSN": ssn, "NATIONAL_ID": national_id, "AWS_ACCESS_KEY": aws_key, "AWS_SECRET_KEY": aws_secret, "GCP_KEY": gcp,
    "GITHUB_TOKEN": github, "GITLAB_TOKEN": gitlab, "SLACK_TOKEN": slack, "STRIPE_KEY": stripe, "SECRET": secret,
    "JWT": jwt, "PRIVATE_KEY": pem, "URL_CREDENTIALS": url_creds, "HIGH_ENTROPY": high_entropy,
}
# Types whose values are only recognizable in context don't get the context-free generic templates.
CONTEXT_ONLY = {"AWS_SECRET_KEY", "SECRET", "URL_CREDENTIALS", "GCP_KEY"}


def positives(per_type=20):
    rows = []
    for kind, gen in GENERATORS.items():
        for i in range(per_type):
            v, tmpls = gen()
            pool = tmpls if kind in CONTEXT_ONLY or i % 2 == 0 else GENERIC
            text = R.choice(pool).replace("{{", "{").replace("}}", "}")
            start = text.index("{v}")
            text = text.replace("{v}", v)
            rows.append({"text": text, "type": kind, "start": start, "end": start + len(v)})
    return rows


def negatives():
    hexd = "0123456789abcdef"
    out = []
    add = out.append
    for _ in range(12):
        add(f"Upgrade to v{R.randint(0, 9)}.{R.randint(0, 30)}.{R.randint(0, 30)} before the release.")
        add(f"Python {R.randint(2, 3)}.{R.randint(0, 13)}.{R.randint(0, 20)} is required (build {R.randint(1000, 99999)}).")
        add(f"firmware {R.randint(1, 9)}.{R.randint(0, 9)}.{R.randint(0, 9)}.{R.randint(0, 99)} fixes the bug")
        add(f"2024-{R.randint(1, 12):02d}-{R.randint(1, 28):02d}T{R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}Z job finished")
        add(f"[{R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}.{digits(3)}] INFO step {R.randint(1, 9999)} loss {R.random():.4f}")
        add(f"created_at={R.randint(1600000000, 1800000000)} updated_ms={R.randint(1600000000000, 1799999999999)}")
        add(f"sha256 of the file: {''.join(R.choice(hexd) for _ in range(64))}")
        add(f"commit {''.join(R.choice(hexd) for _ in range(40))} (HEAD -> main)")
        add(f"md5sum {''.join(R.choice(hexd) for _ in range(32))}  model.bin")
        add(f"image digest sha256:{''.join(R.choice(hexd) for _ in range(64))}")
        u = ''.join(R.choice(hexd) for _ in range(32))
        add(f"request id {u[:8]}-{u[8:12]}-4{u[13:16]}-a{u[17:20]}-{u[20:]} failed")
        add(f"trace {u[:8].upper()}-{u[8:12].upper()}-{u[12:16].upper()}-{u[16:20].upper()}-{u[20:].upper()}")
        add(f"Total: ${R.randint(1, 99)},{R.randint(100, 999)}.{R.randint(0, 99):02d} incl. VAT")
        add(f"Preis: {R.randint(1, 999)},{R.randint(0, 99):02d} EUR, was {R.randint(1000, 9999)}.00 EUR")
        add(f"Revenue grew to USD {R.randint(1, 999)},{R.randint(100, 999)},{R.randint(100, 999)}.00 (+{R.randint(1, 40)}.{R.randint(0, 9)}%)")
        add(f"pi is about 3.{digits(14)} and e is 2.{digits(12)}")
        add(f"Coordinates {R.uniform(-90, 90):.6f}, {R.uniform(-180, 180):.6f} near the station")
        # 16-digit numbers that fail Luhn or have no card prefix: order ids, tracking numbers
        b = "4" + digits(14)
        add(f"Order number {b}{(int(luhn.calc_check_digit(b)) + 1) % 10} shipped")
        add(f"tracking {R.choice('1789')}{digits(15)} via courier")
        add(f"Invoice INV-{digits(6)}-{digits(4)} is due")
        # SSN-shaped but invalid (area 000/666/9xx, group 00)
        add(f"part no. {R.choice(['000', '666', str(R.randint(900, 999))])}-{R.randint(10, 99)}-{digits(4)}")
        add(f"ISBN 978-{R.randint(0, 9)}-{digits(2)}-{digits(6)}-{R.randint(0, 9)} is in the catalog")
        add(f"see section {R.randint(1, 9)}.{R.randint(1, 9)}.{R.randint(1, 9)}.{R.randint(1, 9)} of the spec")
        add(f"OID 1.3.6.1.4.1.{R.randint(100, 99999)}.{R.randint(1, 9)} is registered")
        add(f"invalid address 999.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(256, 999)} rejected")
        add(f"the time was {R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d} on {R.randint(1, 28)}/{R.randint(1, 12)}/2024")
        add(f"IBAN-like but wrong check digits: DE00 {digits(4)} {digits(4)} {digits(4)} {digits(4)} {digits(2)}")
        add(f"ratio {R.randint(1, 9)}:{R.randint(1, 9)}:{R.randint(1, 9)} and score {R.randint(0, 100)}/100")
        add(f"ZIP {digits(5)}-{digits(4)}, room {digits(2)}-{digits(3)}, ext. {digits(4)}")
        add(f"shard model-{R.randint(1, 9):05d}-of-{R.randint(10, 99):05d}.safetensors loaded")
        add(f"matrix {R.randint(2, 4096)}x{R.randint(2, 4096)} in {R.random():.3f} s, lr={R.random() / 1000:.2e}")
    words = ["internationalization", "Donaudampfschifffahrtsgesellschaft", "pneumonoultramicroscopicsilicovolcanoconiosis",
             "incomprehensibilities", "counterrevolutionaries", "electroencephalography", "Rechtsschutzversicherungsgesellschaften",
             "antidisestablishmentarianism", "uncharacteristically", "telecommunications"]
    idents = ["getUserAccountSettingsByIdentifier", "MAX_RETRY_COUNT_FOR_UPLOAD_V2", "self.hidden_size_per_attention_head",
              "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "LlamaForCausalLM.from_pretrained", "test_roundtrip_bf16_odd_shapes2",
              "src/forge_rt/kernels/qlora_cpu.py:142", "HTTPServerErrorResponseHandler404", "AbstractSingletonProxyFactoryBean",
              "node_modules/@babel/core/lib/index.js", "com.example.service.UserRepositoryImpl2", "Win32_NetworkAdapterConfiguration"]
    for w in words:
        add(f"The word {w} is long but ordinary.")
    for i in idents:
        add(f"The stack trace points at {i} again.")
        add(f"rename {i} -> {i}_old")
    prose = [
        "Reset your password from the settings page.", "password: ********", "api_key = os.environ['API_KEY']",
        "password=None", "token_count = 512", "api_key=<your-key-here>", "password: ${DB_PASSWORD}",
        "Never commit your api key to git.", "max_tokens=256, temperature=0.7", "The secret to good bread is time.",
        "Use @staticmethod and @property decorators.", "npm i @angular/core@17.0.1", "Follow @forge_rt for updates",
        "AWS keys start with AKIA followed by sixteen characters.", "GitHub tokens begin with ghp_ and are 40 chars.",
        "A JWT starts with eyJ because of base64.", "std::vector<int> v; std::map<a, b> m;", "deadbeef::cafe is not an address here",
        "Call 911 in an emergency.", "Room 1204, floor 12", "The meeting is at 10:30.", "score: +5.2% vs -0.3% last week",
        "Avogadro is 6.022e23 per mol", "the hash is computed with SHA-256", "Support ticket #48213 resolved",
        "URL https://example.com/docs/v2/index.html?lang=en&page=3", "ssh git@github.com:org/repo.git is a remote",
        "See https://docs.example.org/@user/posts", "password_hash = bcrypt.hash(pw)", "client_secret: required",
        "colors #1a2b3c and #ffcc00", "YouTube id dQw4w9WgXcQ", "base64 SGVsbG8gd29ybGQ=", "-----BEGIN CERTIFICATE-----",
        "Use a 12-word passphrase.", "Set the password= flag to the path of a file, not the value.", "phone: unknown",
        "1 kg = 2.2046 lbs; 1 mile = 1.609344 km", "Bus 42 leaves at 07:15 from stop 3", "UTF-8 BOM is EF BB BF",
        "Chapter 4.1.2.3 describes it", "Tel Aviv is a city", "The ratio 16:9 is common", "Temperature -40 C equals -40 F",
        "Version 10.0.19045.3693 of Windows", "CUDA 12.4.131, driver 550.54.15", "The year 2023 had 365 days",
        "he scored 1,234,567 points", "call_me_maybe() returns None", "user@localhost is a local account",
    ]
    out.extend(prose)
    return out


def main():
    path = Path(__file__).with_name("pii_corpus.jsonl")
    rows = positives() + [{"text": t, "type": None} for t in negatives()]
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {path}: {sum(r['type'] is not None for r in rows)} positives, {sum(r['type'] is None for r in rows)} negatives")


if __name__ == "__main__":
    main()
