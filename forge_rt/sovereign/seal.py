"""Sealed adapters: one encrypted file per adapter directory.

    python -m forge_rt.seal seal RUN_DIR/adapter --out adapter.sealed
    python -m forge_rt.seal unseal adapter.sealed --out restored/
    python -m forge_rt.seal verify adapter.sealed

AES-256-GCM (cryptography) over a tar stream built in memory; the key comes from the passphrase by
scrypt (default) or Argon2id. The passphrase is read from --passphrase-file, FORGE_RT_PASSPHRASE or an
interactive prompt, never from argv. `load_peft` decrypts into memory and loads the adapter into a
PEFT model: plaintext weights never touch the disk.

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

import argparse
import hashlib
import hmac
import io
import json
import os
import struct
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from forge_rt.errors import ForgeError, require_extra
from forge_rt.sovereign.passphrase import (  # noqa: F401 (re-exported)
    PASSPHRASE_ENV,
    PassphraseError,
    get_passphrase,
)

with require_extra("seal", "sealing (forge_rt.sovereign.seal)"):
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"FRTSEAL\0"
VERSION = 1
KDF_SCRYPT, KDF_ARGON2ID = 1, 2
KDF_NAMES = {"scrypt": KDF_SCRYPT, "argon2id": KDF_ARGON2ID}
# scrypt: (log2 N, r, p) -> 32 MiB, ~0.1 s. argon2id: (time cost, memory KiB, lanes) -> 64 MiB.
DEFAULT_PARAMS = {KDF_SCRYPT: (15, 8, 1), KDF_ARGON2ID: (3, 65536, 2)}

_PREFIX = struct.Struct("<8sH")                       # magic, version: read before anything else
_HEADER = struct.Struct("<8sHBB3I16sQ32s16s")         # ... up to and including the key check
_DIGEST_LEN, _NONCE_LEN, _TAG_LEN = 8, 12, 16
_HEADER_END = _HEADER.size + _DIGEST_LEN
_NONCE_END = _HEADER_END + _NONCE_LEN + _DIGEST_LEN
_KEY_CHECK_MSG = b"forge_rt seal key check v1"
# A tar member naming the run an adapter was sealed for (inside the ciphertext, so it is authenticated).
BINDING_MEMBER = ".forge_rt_run"


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


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:_DIGEST_LEN]


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


def _check_params(kdf: int, params: tuple[int, int, int], where: str) -> None:
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


def kdf_name(kdf: int) -> str:
    return {v: k for k, v in KDF_NAMES.items()}.get(kdf, f"kdf#{kdf}")


def seal_bytes(plaintext: bytes, passphrase: str, kdf: str = "scrypt",
               kdf_params: tuple[int, int, int] | None = None) -> bytes:
    """Encrypt `plaintext` into the sealed format."""
    if not passphrase:
        raise SealError("empty passphrase: refusing to seal")
    if kdf not in KDF_NAMES:
        raise SealError(f"unknown KDF {kdf!r}; use one of {', '.join(KDF_NAMES)}")
    kid = KDF_NAMES[kdf]
    params = tuple(kdf_params or DEFAULT_PARAMS[kid])
    _check_params(kid, params, "seal")
    salt, nonce = os.urandom(16), os.urandom(_NONCE_LEN)
    key, check_key = _derive(passphrase, kid, params, salt)
    ct_len = len(plaintext)     # GCM ciphertext (without tag) is as long as the plaintext
    # The ciphertext digest sits in the AAD but is only known after encrypting. GCM's ciphertext does not
    # depend on the AAD, so a first pass with empty AAD yields the same bytes; its tag is discarded and
    # never written, so no second (key, nonce) output is ever exposed.
    ct = AESGCM(key).encrypt(nonce, plaintext, b"")[:-_TAG_LEN]
    header = _HEADER.pack(MAGIC, VERSION, kid, 0, *params, salt, ct_len, hashlib.sha256(ct).digest(),
                          hmac.new(check_key, _KEY_CHECK_MSG, hashlib.sha256).digest()[:16])
    aad = header + _digest(header) + nonce + _digest(nonce)
    return aad + AESGCM(key).encrypt(nonce, plaintext, aad)


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
    if _digest(blob[:_HEADER.size]) != blob[_HEADER.size:_HEADER_END]:
        raise HeaderCorruptError(f"{where}: header is corrupted (its digest does not match); the file was damaged or altered")
    nonce = blob[_HEADER_END:_HEADER_END + _NONCE_LEN]
    if _digest(nonce) != blob[_HEADER_END + _NONCE_LEN:_NONCE_END]:
        raise NonceCorruptError(f"{where}: nonce is corrupted (its digest does not match); the file was damaged or altered")
    _, _, kdf, _, p1, p2, p3, salt, ct_len, ct_sha, key_check = fields
    _check_params(kdf, (p1, p2, p3), where)
    want = _NONCE_END + ct_len + _TAG_LEN
    if len(blob) < want:
        raise TruncatedError(f"{where}: file is truncated: {len(blob)} bytes, the header promises {want}")
    if len(blob) > want:
        raise CiphertextCorruptError(f"{where}: {len(blob) - want} unexpected trailing bytes after the tag")
    if hashlib.sha256(blob[_NONCE_END:_NONCE_END + ct_len]).digest() != ct_sha:
        raise CiphertextCorruptError(f"{where}: ciphertext is corrupted (its digest does not match); the file was damaged or altered")
    return SealedHeader(version, kdf, (p1, p2, p3), salt, ct_len, ct_sha, key_check, nonce)


def unseal_bytes(blob: bytes, passphrase: str, where: str = "sealed data") -> bytes:
    """Check, authenticate and decrypt; raises a specific SealError subclass on each failure mode."""
    h = parse(blob, where)
    key, check_key = _derive(passphrase, h.kdf, h.params, h.salt)
    if not hmac.compare_digest(hmac.new(check_key, _KEY_CHECK_MSG, hashlib.sha256).digest()[:16], h.key_check):
        raise WrongPassphraseError(f"{where}: wrong passphrase")
    try:
        return AESGCM(key).decrypt(h.nonce, blob[_NONCE_END:], blob[:_NONCE_END])
    except InvalidTag:
        raise TagMismatchError(f"{where}: authentication tag does not match: the tag was damaged or the file was "
                               f"tampered with") from None


# --- directories <-> tar stream in memory ---------------------------------------------------
def _tar_dir(path: Path, binding: str | None = None) -> bytes:
    if not path.is_dir():
        raise SealError(f"{path}: not a directory (seal expects an adapter directory, e.g. RUN_DIR/adapter)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            tar.add(f, arcname=f.relative_to(path).as_posix(), recursive=False)
        if binding is not None:
            info = tarfile.TarInfo(BINDING_MEMBER)
            info.size = len(binding.encode())
            tar.addfile(info, io.BytesIO(binding.encode()))
    return buf.getvalue()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SealError(f"{path}: no such file; check the path of the sealed adapter") from None
    except PermissionError:
        raise SealError(f"{path}: permission denied; make it readable (chmod u+r {path})") from None
    except OSError as exc:
        raise SealError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def check_binding(files: dict[str, bytes], binding: str | None, where: str) -> None:
    """Refuses an adapter sealed for another run than `binding`; one sealed without a binding is accepted
    with a warning (it cannot be checked)."""
    if binding is None:
        return
    sealed_for = files.get(BINDING_MEMBER, b"").decode("ascii", "replace")
    if not sealed_for:
        print(f"warning: {where} is not bound to a run (sealed without a binding); it cannot be checked "
              "against this run", file=sys.stderr)
    elif sealed_for != binding:
        raise BindingMismatchError(f"{where} was sealed for run {sealed_for[:16]}, but this run directory is run "
                                   f"{binding[:16]}: it is another run's adapter; open it from the run directory "
                                   "it was sealed in")


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def seal_dir(path, out, passphrase: str, kdf: str = "scrypt", kdf_params=None, binding: str | None = None) -> dict:
    """Seal directory `path` into file `out` (owner-only), bound to `binding` (a run identity) when given.
    Returns a record for the run report."""
    path, out = Path(path), Path(out)
    blob = seal_bytes(_tar_dir(path, binding), passphrase, kdf, kdf_params)
    tmp = out.with_name(out.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return {"source": str(path), "sealed": str(out), "bytes": len(blob), "kdf": kdf,
            "sha256": hashlib.sha256(blob).hexdigest()}


def unseal(sealed_path, out_dir, passphrase: str) -> list[Path]:
    """Decrypt `sealed_path` into directory `out_dir` (created; must be empty). Returns the files written."""
    sealed_path, out_dir = Path(sealed_path), Path(out_dir)
    tar_bytes = unseal_bytes(_read(sealed_path), passphrase, str(sealed_path))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SealError(f"{out_dir}: output directory is not empty; choose a new one")
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        members = [m for m in tar.getmembers() if m.name != BINDING_MEMBER]
        tar.extractall(out_dir, members=members, filter="data")   # refuses absolute paths and ".." members
        names = [m.name for m in members if m.isfile()]
    return [out_dir / n for n in names]


def verify(sealed_path, passphrase: str) -> dict:
    """Fully authenticate `sealed_path` (decrypts in memory, writes nothing). Returns what it holds."""
    sealed_path = Path(sealed_path)
    blob = _read(sealed_path)
    files = _members(unseal_bytes(blob, passphrase, str(sealed_path)))
    bound = files.pop(BINDING_MEMBER, b"").decode("ascii", "replace") or None
    return {**parse(blob, str(sealed_path)).describe(), "bound_to_run": bound,
            "files": {n: len(b) for n, b in sorted(files.items())}}


def load_peft(model, sealed_path, passphrase: str, adapter_name: str = "default", is_trainable: bool = False,
              binding: str | None = None):
    """Decrypt a sealed adapter in memory and load it into `model` (a base model or a PeftModel); with
    `binding`, refuse an adapter sealed for another run. Returns the PeftModel. No plaintext byte is
    written to disk."""
    import peft
    import safetensors.torch
    import torch

    sealed_path = Path(sealed_path)
    files = _members(unseal_bytes(_read(sealed_path), passphrase, str(sealed_path)))
    check_binding(files, binding, str(sealed_path))
    if "adapter_config.json" not in files:
        raise SealError(f"{sealed_path}: no adapter_config.json inside; was it sealed from a PEFT adapter directory?")
    config = peft.PeftConfig.from_peft_type(**json.loads(files["adapter_config.json"]))
    config.inference_mode = not is_trainable
    if "adapter_model.safetensors" in files:
        state = safetensors.torch.load(files["adapter_model.safetensors"])
    elif "adapter_model.bin" in files:
        state = torch.load(io.BytesIO(files["adapter_model.bin"]), weights_only=True)
    else:
        raise SealError(f"{sealed_path}: no adapter_model.safetensors or adapter_model.bin inside")
    if isinstance(model, peft.PeftModel):
        model.add_adapter(adapter_name, config)
    else:
        model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    loaded = peft.set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if loaded.unexpected_keys:
        raise SealError(f"{sealed_path}: adapter weights do not fit this model (unexpected keys, e.g. "
                        f"{loaded.unexpected_keys[:3]}); is it the base model the adapter was trained on?")
    if not is_trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    model.set_adapter(adapter_name)
    return model


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("seal", "unseal", "verify", "-h", "--help"):
        argv.insert(0, "seal")   # `python -m forge_rt.seal RUN_DIR/adapter` seals
    ap = argparse.ArgumentParser(prog="python -m forge_rt.seal", description=__doc__.split("\n\n")[0])
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
        p.add_argument("--passphrase-file", help="read the passphrase from this file (else $%s or a prompt)" % PASSPHRASE_ENV)
    a = ap.parse_args(argv)
    try:
        pw = get_passphrase(a.passphrase_file, confirm=a.cmd == "seal")
        if a.cmd == "seal":
            src = Path(a.path.rstrip("/"))
            out = a.out or str(src.with_name(src.name + ".sealed"))
            rec = seal_dir(a.path, out, pw, kdf=a.kdf)
            if a.shred_plaintext:
                from forge_rt.sovereign.shred import shred_paths
                rec["shred"] = shred_paths([a.path])
            print(json.dumps(rec, indent=2))
        elif a.cmd == "unseal":
            files = unseal(a.file, a.out, pw)
            print(f"unsealed {len(files)} file(s) into {a.out}")
        else:
            print(json.dumps(verify(a.file, pw), indent=2))
            print("OK: authentic and decryptable")
    except ForgeError as e:  # SealError, PassphraseError, MissingExtra, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
