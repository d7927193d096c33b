"""Sealed adapters: the file opened with `cryptography` directly, byte-identical round trip, one distinct error
per failure mode, in-memory PEFT load."""
import hashlib
import io
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from forge_rt.sovereign import seal, sealfile
from forge_rt.sovereign.seal import (CiphertextCorruptError, HeaderCorruptError, NonceCorruptError, NotSealedError, SealError,
                           TagMismatchError, TruncatedError, UnsupportedVersionError, WrongPassphraseError)

FAST = (12, 8, 1)   # scrypt N=4096 keeps the tests quick; the default is 2**15
PW = "correct horse battery staple"


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def adapter_dir(tmp_path):
    d = tmp_path / "adapter"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4097))
    (d / "sub" / "empty.txt").write_bytes(b"")
    (d / "ünïcode name.bin").write_bytes(bytes(range(256)))
    return d


@pytest.fixture
def sealed(adapter_dir, tmp_path):
    out = tmp_path / "adapter.sealed"
    rec = seal.seal_dir(adapter_dir, out, PW, kdf_params=FAST)
    assert rec["bytes"] == out.stat().st_size
    return out


def test_round_trip_byte_identical(adapter_dir, sealed, tmp_path):
    raw = sealed.read_bytes()
    for blob in (b"forge_rt", b"adapter_config", b"LORA"):
        assert blob not in raw     # nothing readable in the sealed file
    files = seal.unseal(sealed, tmp_path / "restored", PW)
    assert len(files) == 4 and _tree(tmp_path / "restored") == _tree(adapter_dir)
    info = seal.verify(sealed, PW)
    assert info["kdf"] == "scrypt" and info["files"]["adapter_model.safetensors"] == 4097


# The documented layout (sealfile's docstring), read here without forge_rt: magic, version, kdf, reserved,
# 3 kdf params, salt, ciphertext length, its SHA-256, key check, header digest, nonce, nonce digest.
_LAYOUT = struct.Struct("<8sHBB3I16sQ32s16s8s12s8s")


def _open_with_cryptography(blob: bytes, passphrase: str) -> tuple[bytes, bytes, bytes]:
    """(plaintext, salt, nonce): the key from the standard library's scrypt (64 bytes, the first 32 are the
    AES-256 key), then cryptography's AES-256-GCM over the ciphertext + tag, everything before as the AAD."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    magic, version, kdf, _, log_n, r, p, salt, ct_len, ct_sha, _, _, nonce, _ = _LAYOUT.unpack_from(blob)
    assert (magic, version, kdf) == (b"FRTSEAL\0", 1, 1) and (log_n, r, p) == FAST
    aad_end = _LAYOUT.size
    assert len(blob) == aad_end + ct_len + 16 and hashlib.sha256(blob[aad_end:aad_end + ct_len]).digest() == ct_sha
    key = hashlib.scrypt(passphrase.encode(), salt=salt, n=1 << log_n, r=r, p=p, dklen=64, maxmem=64 << 20)[:32]
    return AESGCM(key).decrypt(nonce, blob[aad_end:], blob[:aad_end]), salt, nonce


def test_sealed_file_opens_with_cryptography_directly(adapter_dir, sealed, tmp_path):
    """The file is what its format says: AES-256-GCM under the scrypt-derived key, authenticated over the
    header; the plaintext is a tar of the adapter directory. A second seal draws a fresh salt and nonce."""
    from cryptography.exceptions import InvalidTag
    blob = sealed.read_bytes()
    plain, salt, nonce = _open_with_cryptography(blob, PW)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert files == _tree(adapter_dir)
    with pytest.raises(InvalidTag):  # the header is authenticated: one bit of the kdf's reserved byte
        _open_with_cryptography(blob[:11] + bytes([blob[11] ^ 1]) + blob[12:], PW)
    again = seal.seal_dir(adapter_dir, tmp_path / "again.sealed", PW, kdf_params=FAST)
    blob2 = (tmp_path / "again.sealed").read_bytes()
    plain2, salt2, nonce2 = _open_with_cryptography(blob2, PW)
    assert again["bytes"] == len(blob2) and plain2 == plain
    assert salt2 != salt and nonce2 != nonce and len(set(salt + salt2)) > 8
    assert blob2[_LAYOUT.size:] != blob[_LAYOUT.size:]


def test_argon2id_round_trip():
    pytest.importorskip("argon2")
    blob = seal.seal_bytes(b"x" * 100, PW, kdf="argon2id", kdf_params=(1, 1024, 1))
    assert seal.unseal_bytes(blob, PW) == b"x" * 100
    with pytest.raises(WrongPassphraseError):
        seal.unseal_bytes(blob, PW + "!")


def test_empty_payload_and_bad_inputs(tmp_path):
    assert seal.unseal_bytes(seal.seal_bytes(b"", PW, kdf_params=FAST), PW) == b""
    with pytest.raises(SealError, match="not a directory"):
        seal.seal_dir(tmp_path / "missing", tmp_path / "x.sealed", PW)
    with pytest.raises(SealError, match="empty passphrase"):
        seal.seal_bytes(b"x", "")


def _flip(blob: bytes, offset: int) -> bytes:
    b = bytearray(blob)
    b[offset] ^= 0x10
    return bytes(b)


def test_each_failure_mode_has_its_own_error(sealed):
    blob = sealed.read_bytes()
    h, nonce_at, ct_at = sealfile._HEADER.size, sealfile._HEADER_END, sealfile._NONCE_END
    cases = {
        "wrong passphrase": (blob, "not the passphrase", WrongPassphraseError),
        "bad magic": (_flip(blob, 0), PW, NotSealedError),
        "wrong version": (blob[:8] + (7).to_bytes(2, "little") + blob[10:], PW, UnsupportedVersionError),
        "header bit (salt)": (_flip(blob, 30), PW, HeaderCorruptError),
        "header bit (kdf params)": (_flip(blob, 13), PW, HeaderCorruptError),
        "nonce bit": (_flip(blob, nonce_at + 3), PW, NonceCorruptError),
        "ciphertext bit": (_flip(blob, ct_at + 100), PW, CiphertextCorruptError),
        "tag bit": (_flip(blob, len(blob) - 5), PW, TagMismatchError),
        "truncated body": (blob[:-1], PW, TruncatedError),
        "truncated header": (blob[:h - 3], PW, TruncatedError),
        "empty file": (b"", PW, TruncatedError),
    }
    messages = set()
    for name, (data, pw, err) in cases.items():
        with pytest.raises(SealError) as exc:
            seal.unseal_bytes(data, pw, where="f.sealed")
        assert type(exc.value) is err, (name, exc.value)
        assert "f.sealed" in str(exc.value)
        messages.add(str(exc.value).split(":", 1)[1])
    assert len(messages) >= len(set(e for *_, e in cases.values()))


def test_passphrase_sources(tmp_path, monkeypatch):
    f = tmp_path / "pw"
    f.write_text("from file\n")
    monkeypatch.setenv(seal.PASSPHRASE_ENV, "from env")
    assert seal.get_passphrase(f) == "from file"
    assert seal.get_passphrase() == "from env"
    monkeypatch.delenv(seal.PASSPHRASE_ENV)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    with pytest.raises(seal.PassphraseError, match="FORGE_RT_PASSPHRASE"):
        seal.get_passphrase()


def test_cli_seal_verify_unseal(adapter_dir, tmp_path):
    env = {**os.environ, seal.PASSPHRASE_ENV: PW, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "forge_rt.seal", *map(str, a)], env=env,
                                    capture_output=True, text=True)
    r = run(adapter_dir)   # bare path = seal, default output PATH.sealed
    assert r.returncode == 0, r.stderr
    out = tmp_path / "adapter.sealed"
    assert out.exists() and PW not in r.stdout
    assert run("verify", out).returncode == 0
    assert run("unseal", out, "--out", tmp_path / "back").returncode == 0
    assert _tree(tmp_path / "back") == _tree(adapter_dir)
    env[seal.PASSPHRASE_ENV] = "wrong"
    r = run("verify", out)
    assert r.returncode == 2 and "wrong passphrase" in r.stderr
    env[seal.PASSPHRASE_ENV] = PW
    r = run("seal", tmp_path / "back", "--out", tmp_path / "again.sealed", "--kdf", "argon2id", "--shred-plaintext")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "back").exists() and '"files": 4' in r.stdout
    assert run("verify", tmp_path / "again.sealed").returncode == 0


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_load_peft_matches_plain_adapter_without_touching_disk(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    base = _tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():   # LoRA B starts at zero; randomize so the adapter changes the logits
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    plain = tmp_path / "adapter"
    lora.save_pretrained(plain)
    sealed = tmp_path / "adapter.sealed"
    seal.seal_dir(plain, sealed, PW, kdf_params=FAST)

    ids = torch.randint(0, 97, (2, 11))

    def fresh():
        m = _tiny_llama()
        m.load_state_dict(state)
        return m
    with torch.no_grad():
        ref = PeftModel.from_pretrained(fresh(), plain).eval()(ids).logits
        base_logits = fresh()(ids).logits

    # Audit hooks see every open (builtins, io, os.open, C extensions going through Python): record writes.
    writes, watching = [], [True]

    def hook(event, args):
        if watching[0] and event == "open":
            path, mode, flags = args
            if any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                writes.append(path)
    sys.addaudithook(hook)   # cannot be removed; `watching` switches it off
    model = seal.load_peft(fresh(), sealed, PW)
    watching[0] = False
    assert writes == [], writes
    with torch.no_grad():
        got = model(ids).logits
    assert not torch.allclose(ref, base_logits, atol=1e-3)     # the adapter matters
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(WrongPassphraseError):
        seal.load_peft(fresh(), sealed, "nope")


# `python -m forge_rt.seal` with the `seal` extra missing: import of cryptography fails as if not installed.
NO_CRYPTOGRAPHY = """
import runpy, sys
sys.modules["cryptography"] = None
sys.argv = ["forge_rt.seal", *sys.argv[1:]]
runpy.run_module("forge_rt.seal", run_name="__main__")
"""


def test_cli_without_the_seal_extra(tmp_path):
    env = {**os.environ, seal.PASSPHRASE_ENV: PW, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = lambda *a: subprocess.run([sys.executable, "-c", NO_CRYPTOGRAPHY, *map(str, a)], env=env,
                                    capture_output=True, text=True, timeout=120)
    r = run("--help")
    assert r.returncode == 0 and "usage" in r.stdout and "Traceback" not in r.stderr, r.stderr
    r = run("seal", "--help")
    assert r.returncode == 0 and "argon2id" in r.stdout, r.stderr
    r = run("verify", tmp_path / "x.sealed")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "pip install 'forge_rt[seal]'" in lines[0], r.stderr
