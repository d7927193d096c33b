"""The sealed-file format: its layout, its errors, and the structural checks that need no passphrase
and no cryptography package (the keys and the cipher are in `sealcrypt`).

File layout (all integers little-endian):

    magic "FRTSEAL\\0" | version u16 | kdf u8 | reserved u8 | kdf params 3 x u32 | salt 16 |
    ciphertext length u64 | SHA-256 of ciphertext 32 | key check 16 | header digest 8 |
    nonce 12 | nonce digest 8 | ciphertext | GCM tag 16

Everything before the ciphertext is the GCM associated data, so any change to it fails
authentication. The unkeyed digests (header, nonce, ciphertext) and the key check (an HMAC under a
second key derived from the passphrase) only serve diagnosis: they tell a corrupted header, nonce,
ciphertext or tag and a wrong passphrase apart, each with its own error.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from forge_rt.core.errors import ForgeError

MAGIC = b"FRTSEAL\0"
VERSION = 1
KDF_SCRYPT, KDF_ARGON2ID = 1, 2
KDF_NAMES = {"scrypt": KDF_SCRYPT, "argon2id": KDF_ARGON2ID}
# scrypt: (log2 N, r, p) -> 32 MiB, ~0.1 s. argon2id: (time cost, memory KiB, lanes) -> 64 MiB.
DEFAULT_PARAMS = {KDF_SCRYPT: (15, 8, 1), KDF_ARGON2ID: (3, 65536, 2)}

_PREFIX = struct.Struct("<8sH")                       # magic, version: read before anything else
_HEADER = struct.Struct("<8sHBB3I16sQ32s16s")         # ... up to and including the key check
_DIGEST_LEN, NONCE_LEN, TAG_LEN = 8, 12, 16
_HEADER_END = _HEADER.size + _DIGEST_LEN
_NONCE_END = _HEADER_END + NONCE_LEN + _DIGEST_LEN


class SealError(ForgeError):
    """Base of every sealed-file error."""


class NotSealedError(SealError):
    pass


class UnsupportedVersionError(SealError):
    pass


class TruncatedError(SealError):
    pass


class HeaderCorruptError(SealError):
    pass


class NonceCorruptError(SealError):
    pass


class CiphertextCorruptError(SealError):
    pass


class TagMismatchError(SealError):
    pass


class WrongPassphraseError(SealError):
    pass


class BindingMismatchError(SealError):
    """A sealed adapter opened for a run other than the one it was sealed in."""


def digest(data: bytes) -> bytes:
    """The short unkeyed digest beside the header and the nonce."""
    return hashlib.sha256(data).digest()[:_DIGEST_LEN]


def kdf_name(kdf: int) -> str:
    return {v: k for k, v in KDF_NAMES.items()}.get(kdf, f"kdf#{kdf}")


def check_params(kdf: int, params: tuple[int, int, int], where: str) -> None:
    # Bounds keep a hostile header from asking for terabytes of KDF memory.
    if kdf == KDF_SCRYPT:
        log_n, r, p = params
        ok = 10 <= log_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16
    elif kdf == KDF_ARGON2ID:
        t, m, lanes = params
        ok = 1 <= t <= 64 and 8 * lanes <= m <= 4 * 1024 * 1024 and 1 <= lanes <= 64
    else:
        raise HeaderCorruptError(f"{where}: unknown KDF id {kdf} (1 = scrypt, 2 = argon2id)")
    if not ok:
        raise HeaderCorruptError(f"{where}: KDF parameters {params} are out of range for {kdf_name(kdf)}")


def pack_header(kdf: int, params: tuple[int, int, int], salt: bytes, ct_len: int, ct_sha256: bytes,
                key_check: bytes, nonce: bytes) -> bytes:
    """The associated data: header, its digest, nonce, its digest (everything before the ciphertext)."""
    header = _HEADER.pack(MAGIC, VERSION, kdf, 0, *params, salt, ct_len, ct_sha256, key_check)
    return header + digest(header) + nonce + digest(nonce)


@dataclass
class SealedHeader:
    version: int
    kdf: int
    params: tuple[int, int, int]
    salt: bytes
    ct_len: int
    ct_sha256: bytes
    key_check: bytes
    nonce: bytes

    def describe(self) -> dict:
        return {"version": self.version, "kdf": kdf_name(self.kdf), "kdf_params": list(self.params),
                "ciphertext_bytes": self.ct_len}


def split(blob: bytes) -> tuple[bytes, bytes]:
    """(associated data, ciphertext + tag) of a blob that `parse` accepted."""
    return blob[:_NONCE_END], blob[_NONCE_END:]


def parse(blob: bytes, where: str = "sealed data") -> SealedHeader:
    """Structural checks that need no passphrase, in the order that gives the most precise error."""
    if len(blob) < _PREFIX.size:
        raise TruncatedError(f"{where}: {len(blob)} bytes is too short to be a sealed file (truncated?)")
    magic, version = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise NotSealedError(f"{where}: not a forge_rt sealed file (bad magic {magic!r})")
    if version != VERSION:
        raise UnsupportedVersionError(f"{where}: sealed-file version {version} is not supported by this forge_rt "
                                      f"(it reads version {VERSION}); upgrade forge_rt or re-seal the adapter")
    if len(blob) < _NONCE_END:
        raise TruncatedError(f"{where}: header is cut off ({len(blob)} of {_NONCE_END} bytes): the file is truncated")
    fields = _HEADER.unpack_from(blob)
    if digest(blob[:_HEADER.size]) != blob[_HEADER.size:_HEADER_END]:
        raise HeaderCorruptError(f"{where}: header is corrupted (its digest does not match); the file was damaged or altered")
    nonce = blob[_HEADER_END:_HEADER_END + NONCE_LEN]
    if digest(nonce) != blob[_HEADER_END + NONCE_LEN:_NONCE_END]:
        raise NonceCorruptError(f"{where}: nonce is corrupted (its digest does not match); the file was damaged or altered")
    _, _, kdf, _, p1, p2, p3, salt, ct_len, ct_sha, key_check = fields
    check_params(kdf, (p1, p2, p3), where)
    want = _NONCE_END + ct_len + TAG_LEN
    if len(blob) < want:
        raise TruncatedError(f"{where}: file is truncated: {len(blob)} bytes, the header promises {want}")
    if len(blob) > want:
        raise CiphertextCorruptError(f"{where}: {len(blob) - want} unexpected trailing bytes after the tag")
    if hashlib.sha256(blob[_NONCE_END:_NONCE_END + ct_len]).digest() != ct_sha:
        raise CiphertextCorruptError(f"{where}: ciphertext is corrupted (its digest does not match); the file was damaged or altered")
    return SealedHeader(version, kdf, (p1, p2, p3), salt, ct_len, ct_sha, key_check, nonce)
