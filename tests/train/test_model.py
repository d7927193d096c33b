"""Model paths that cannot be a model fail fast, naming the path and the fix."""
import json

import pytest

from forge_rt.models import ModelLoadError, check_model_path, default_gguf_path


def test_default_model_is_shipped():
    p = default_gguf_path()
    assert p.suffix == ".gguf" and p.stat().st_size > 50_000_000


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_path(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_model_path(tmp_path)


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        check_model_path(tmp_path)


def test_dir_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        check_model_path(tmp_path)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="bad magic"):
        check_model_path(bad)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        check_model_path(f)


def test_truncated_gguf_is_a_load_error(tmp_path):
    from forge_rt.models import load_model
    cut = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as src:
        cut.write_bytes(src.read(2_000_000))
    with pytest.raises(ModelLoadError, match="could not load model from .*cut.gguf"):
        load_model(cut)
