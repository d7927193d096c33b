"""`python -m forge_rt.seal`: an adapter directory as one encrypted file, and back.

    python -m forge_rt.seal seal RUN_DIR/adapter --out adapter.sealed
    python -m forge_rt.seal unseal adapter.sealed --out restored/
    python -m forge_rt.seal verify adapter.sealed

AES-256-GCM, the key from the passphrase by scrypt (default) or Argon2id (forge_rt.sovereign.seal).
The passphrase is read from --passphrase-file, FORGE_RT_PASSPHRASE or an interactive prompt, never
from argv. The flags parse without the `seal` extra; the work needs it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from forge_rt.cli.common import run_command
from forge_rt.sovereign.passphrase import PASSPHRASE_ENV, get_passphrase
from forge_rt.sovereign.sealfile import KDF_NAMES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("seal", "unseal", "verify", "-h", "--help"):
        argv.insert(0, "seal")   # `python -m forge_rt.seal RUN_DIR/adapter` seals
    ap = argparse.ArgumentParser(prog="python -m forge_rt.seal", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seal", help="encrypt an adapter directory into one file")
    s.add_argument("path")
    s.add_argument("--out", help="sealed file (default: PATH.sealed)")
    s.add_argument("--kdf", choices=sorted(KDF_NAMES), default="scrypt")
    s.add_argument("--shred-plaintext", action="store_true", help="overwrite and delete PATH after sealing")
    u = sub.add_parser("unseal", help="decrypt a sealed file into a directory")
    u.add_argument("file")
    u.add_argument("--out", required=True)
    v = sub.add_parser("verify", help="authenticate a sealed file without writing anything")
    v.add_argument("file")
    for p in (s, u, v):
        p.add_argument("--passphrase-file", help=f"read the passphrase from this file (else ${PASSPHRASE_ENV} or a prompt)")
    a = ap.parse_args(argv)
    return run_command(lambda: _run(a))


def _run(a) -> None:
    # Needs the `seal` extra: without it the import raises MissingExtra, which run_command says in one line.
    from forge_rt.sovereign import seal

    pw = get_passphrase(a.passphrase_file, confirm=a.cmd == "seal")
    if a.cmd == "seal":
        src = Path(a.path.rstrip("/"))
        out = a.out or str(src.with_name(src.name + ".sealed"))
        rec = seal.seal_dir(a.path, out, pw, kdf=a.kdf)
        if a.shred_plaintext:
            from forge_rt.sovereign.shred import shred_paths
            rec["shred"] = shred_paths([a.path])
        print(json.dumps(rec, indent=2))
    elif a.cmd == "unseal":
        files = seal.unseal(a.file, a.out, pw)
        print(f"unsealed {len(files)} file(s) into {a.out}")
    else:
        print(json.dumps(seal.verify(a.file, pw), indent=2))
        print("OK: authentic and decryptable")
