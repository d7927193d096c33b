"""The one place a passphrase is read (sealing, the trainer's --seal, generate/export of a sealed run)."""
from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from forge_rt.core.errors import ForgeError

PASSPHRASE_ENV = "FORGE_RT_PASSPHRASE"


class PassphraseError(ForgeError):
    """No usable passphrase source."""


def get_passphrase(passphrase_file=None, confirm: bool = False, what: str = "passphrase") -> str:
    """From --passphrase-file, else FORGE_RT_PASSPHRASE, else an interactive prompt (never argv).
    `confirm` asks twice at a prompt (for sealing); an empty passphrase is refused from any source."""
    if passphrase_file is not None:
        try:
            text = Path(passphrase_file).read_text(encoding="utf-8")
        except OSError as e:
            raise PassphraseError(f"{passphrase_file}: cannot read passphrase file ({e.strerror})") from None
        pw = text[:-1] if text.endswith("\n") else text
        source = str(passphrase_file)
    elif os.environ.get(PASSPHRASE_ENV):
        pw, source = os.environ[PASSPHRASE_ENV], PASSPHRASE_ENV
    elif sys.stdin.isatty():
        pw, source = getpass.getpass(f"{what}: "), "prompt"
        if confirm and getpass.getpass(f"repeat {what}: ") != pw:
            raise PassphraseError("the two passphrases differ")
    else:
        raise PassphraseError(f"no passphrase: set {PASSPHRASE_ENV}, pass --passphrase-file FILE, or run in a terminal")
    if not pw:
        raise PassphraseError(f"empty passphrase from {source}")
    return pw
