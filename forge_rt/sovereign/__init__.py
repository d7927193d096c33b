"""Sovereign tools: nothing leaves the machine, nothing readable is left behind.

`guard` blocks egress (offline()), `scrub/` removes PII and secrets from training text, `seal`
encrypts adapters (AES-256-GCM; the file format is `sealfile`, the cipher `sealcrypt`), `shred`
overwrites and deletes plaintext, `passphrase` is the one place a passphrase is read."""
from __future__ import annotations

from forge_rt.sovereign.guard import OFFLINE_ENV, EgressBlocked, Guard, install, offline, set_offline_env

__all__ = ["OFFLINE_ENV", "EgressBlocked", "Guard", "install", "offline", "set_offline_env"]
