"""The keys and the cipher of a sealed file: scrypt (default) or Argon2id from the passphrase, then
AES-256-GCM over the payload with the header as associated data (layout and checks: `sealfile`)."""
from __future__ import annotations

import hashlib
import hmac
import os

from forge_rt.core.errors import require_extra
from forge_rt.sovereign.sealfile import (
    DEFAULT_PARAMS,
    KDF_ARGON2ID,
    KDF_NAMES,
    KDF_SCRYPT,
    NONCE_LEN,
    TAG_LEN,
    HeaderCorruptError,
    SealError,
    TagMismatchError,
    WrongPassphraseError,
    check_params,
    pack_header,
    parse,
    split,
)

with require_extra("seal", "sealing (forge_rt.sovereign.seal)"):
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

_KEY_CHECK_MSG = b"forge_rt seal key check v1"


def _derive(passphrase: str, kdf: int, params: tuple[int, int, int], salt: bytes) -> tuple[bytes, bytes]:
    """64 bytes from the KDF: the AES-256 key and a key for the passphrase check."""
    secret = passphrase.encode("utf-8")
    if kdf == KDF_SCRYPT:
        log_n, r, p = params
        out = Scrypt(salt=salt, length=64, n=1 << log_n, r=r, p=p).derive(secret)
    elif kdf == KDF_ARGON2ID:
        from argon2.low_level import (  # optional dependency: argon2-cffi
            Type,
            hash_secret_raw,
        )
        t, m, lanes = params
        out = hash_secret_raw(secret, salt, time_cost=t, memory_cost=m, parallelism=lanes, hash_len=64, type=Type.ID)
    else:
        raise HeaderCorruptError(f"unknown KDF id {kdf}")
    return out[:32], out[32:]


def _key_check(check_key: bytes) -> bytes:
    return hmac.new(check_key, _KEY_CHECK_MSG, hashlib.sha256).digest()[:16]


def seal_bytes(plaintext: bytes, passphrase: str, kdf: str = "scrypt",
               kdf_params: tuple[int, int, int] | None = None) -> bytes:
    """Encrypt `plaintext` into the sealed format."""
    if not passphrase:
        raise SealError("empty passphrase: refusing to seal")
    if kdf not in KDF_NAMES:
        raise SealError(f"unknown KDF {kdf!r}; use one of {', '.join(KDF_NAMES)}")
    kid = KDF_NAMES[kdf]
    params = tuple(kdf_params or DEFAULT_PARAMS[kid])
    check_params(kid, params, "seal")
    salt, nonce = os.urandom(16), os.urandom(NONCE_LEN)
    key, check_key = _derive(passphrase, kid, params, salt)
    # The ciphertext digest sits in the AAD but is only known after encrypting. GCM's ciphertext does not
    # depend on the AAD, so a first pass with empty AAD yields the same bytes; its tag is discarded and
    # never written, so no second (key, nonce) output is ever exposed.
    ct = AESGCM(key).encrypt(nonce, plaintext, b"")[:-TAG_LEN]
    aad = pack_header(kid, params, salt, len(ct), hashlib.sha256(ct).digest(), _key_check(check_key), nonce)
    return aad + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal_bytes(blob: bytes, passphrase: str, where: str = "sealed data") -> bytes:
    """Check, authenticate and decrypt; raises a specific SealError subclass on each failure mode."""
    h = parse(blob, where)
    key, check_key = _derive(passphrase, h.kdf, h.params, h.salt)
    if not hmac.compare_digest(_key_check(check_key), h.key_check):
        raise WrongPassphraseError(f"{where}: wrong passphrase")
    aad, body = split(blob)
    try:
        return AESGCM(key).decrypt(h.nonce, body, aad)
    except InvalidTag:
        raise TagMismatchError(f"{where}: authentication tag does not match: the tag was damaged or the file was "
                               f"tampered with") from None
