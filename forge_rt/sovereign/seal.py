"""Sealed adapters: an adapter directory as one encrypted file, and back (to a directory, or straight
into a PEFT model without a plaintext byte on disk).

The directory becomes a tar stream built in memory, with a member naming the run it was sealed for
(the binding, inside the ciphertext, so it is authenticated); the stream is sealed by `sealcrypt`
(AES-256-GCM, key from the passphrase by scrypt or Argon2id) into the format of `sealfile`. The
command line is `python -m forge_rt.seal` (forge_rt.cli.seal); the passphrase is read by `passphrase`.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

from forge_rt.core.atomic import write_atomic
from forge_rt.sovereign.passphrase import PASSPHRASE_ENV, PassphraseError, get_passphrase
from forge_rt.sovereign.sealcrypt import seal_bytes, unseal_bytes
from forge_rt.sovereign.sealfile import (
    DEFAULT_PARAMS,
    KDF_NAMES,
    BindingMismatchError,
    CiphertextCorruptError,
    HeaderCorruptError,
    NonceCorruptError,
    NotSealedError,
    SealedHeader,
    SealError,
    TagMismatchError,
    TruncatedError,
    UnsupportedVersionError,
    WrongPassphraseError,
    parse,
)

__all__ = ["BINDING_MEMBER", "DEFAULT_PARAMS", "KDF_NAMES", "PASSPHRASE_ENV", "BindingMismatchError",
           "CiphertextCorruptError", "HeaderCorruptError", "NonceCorruptError", "NotSealedError",
           "PassphraseError", "SealError", "SealedHeader", "TagMismatchError", "TruncatedError",
           "UnsupportedVersionError", "WrongPassphraseError", "check_binding", "get_passphrase",
           "load_peft", "parse", "seal_bytes", "seal_dir", "unseal", "unseal_bytes", "verify"]

# A tar member naming the run an adapter was sealed for (inside the ciphertext, so it is authenticated).
BINDING_MEMBER = ".forge_rt_run"


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


def _members(blob: bytes, passphrase: str, where: str) -> dict[str, bytes]:
    """Every file of a sealed tar stream by name, decrypted in memory."""
    tar_bytes = unseal_bytes(blob, passphrase, where)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


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


def seal_dir(path, out, passphrase: str, kdf: str = "scrypt", kdf_params=None, binding: str | None = None) -> dict:
    """Seal directory `path` into file `out` (owner-only), bound to `binding` (a run identity) when given.
    Returns a record for the run report."""
    path, out = Path(path), Path(out)
    blob = seal_bytes(_tar_dir(path, binding), passphrase, kdf, kdf_params)
    write_atomic(out, blob, mode=0o600)
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
    files = _members(blob, passphrase, str(sealed_path))
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
    files = _members(_read(sealed_path), passphrase, str(sealed_path))
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
