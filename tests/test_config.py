import subprocess
import sys
from dataclasses import fields

import pytest
import tomllib
from conftest import ROOT, subprocess_env

from shammah.config import Config, from_dict, iter_keys, load_config, render_example
from shammah.errors import ConfigError


def test_example_file_matches_code_defaults():
    text = (ROOT / "config.example.toml").read_text()
    assert text == render_example(), "config.example.toml is stale: regenerate with `shammah config example`"
    parsed = tomllib.loads(text)
    assert from_dict(parsed, env={}) == Config()
    documented = {(s, k) for s, body in parsed.items() for k in body}
    assert documented == {(s, f.name) for s, f in iter_keys()}


def test_every_field_is_documented():
    for sec, f in iter_keys():
        assert f.metadata["doc"], f"{sec}.{f.name} has no doc line"


def test_all_problems_listed_together():
    data = {"model": {"bsae": "x", "temperature": 9, "threads": "two", "device": "tpu"}, "modle": {}}
    with pytest.raises(ConfigError) as exc:
        from_dict(data, source="cfg.toml", env={})
    msg = str(exc.value)
    assert len(exc.value.problems) == 5
    assert "unknown key 'model.bsae' (did you mean 'model.base'?)" in msg
    assert "model.temperature = 9 is out of range: must be between 0.0 and 5.0" in msg
    assert "model.threads = 'two' has the wrong type: expected an integer" in msg
    assert "model.device = 'tpu' is not allowed: choose one of 'auto', 'cpu', 'cuda', 'mps'" in msg
    assert "unknown section 'modle'" in msg
    assert "cfg.toml" in msg


def test_bool_is_not_an_int_and_int_is_a_float():
    with pytest.raises(ConfigError, match="model.threads = True has the wrong type"):
        from_dict({"model": {"threads": True}}, env={})
    assert from_dict({"model": {"temperature": 1}}, env={}).model.temperature == 1.0


def test_sampling_keys_take_auto_or_a_value():
    assert from_dict({}, env={}).model.temperature == "auto"
    assert from_dict({"model": {"top_k": 20, "temperature": "auto"}}, env={}).model.top_k == 20
    with pytest.raises(
        ConfigError, match="model.temperature = 'hot' has the wrong type: expected a number or \"auto\""
    ):
        from_dict({"model": {"temperature": "hot"}}, env={})


def test_env_overrides_and_their_errors(tmp_path):
    cfg = from_dict({"model": {"base": "from-file/x"}}, env={"SHAMMAH_MODEL": "embedded", "SHAMMAH_THREADS": "1"})
    assert cfg.model.base == "embedded" and cfg.model.threads == 1
    with pytest.raises(ConfigError, match=r"model.threads \(from \$SHAMMAH_THREADS\) = 'lots'"):
        from_dict({}, env={"SHAMMAH_THREADS": "lots"})
    with pytest.raises(ConfigError, match=r"logging.level \(from \$SHAMMAH_LOG\) = 'loud' is not allowed"):
        from_dict({}, env={"SHAMMAH_LOG": "loud"})


def test_config_file_location(tmp_path, shammah_home, monkeypatch):
    cfg, path = load_config(env={})
    assert path == shammah_home / "config.toml" and cfg == Config()
    shammah_home.mkdir(parents=True)
    (shammah_home / "config.toml").write_text('[model]\nbase = "embedded"\n')
    assert load_config(env={})[0].model.base == "embedded"
    explicit = tmp_path / "other.toml"
    explicit.write_text("[chat]\nhistory = false\n")
    assert load_config(explicit, env={})[0].chat.history is False
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml", env={})
    (tmp_path / "broken.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml", env={})


def test_cli_reports_config_errors_in_one_place_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ntemprature = 0.5\ntop_p = 2\n")
    r = subprocess.run(
        [sys.executable, "-m", "shammah", "--config", str(bad), "config"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "unknown key 'model.temprature' (did you mean 'model.temperature'?)" in r.stderr
    assert "model.top_p = 2 is out of range" in r.stderr


def test_every_config_section_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("## ", 1)[0]
    missing = [f.name for f in fields(Config) if f"`{f.name}." not in table]
    assert not missing, f"README's configuration table lacks {missing}"


def test_config_prints_toml_that_loads_back_and_names_the_environment(tmp_path):
    """`shammah config` output can be saved as a config file: it parses as TOML (booleans as
    true/false, quotes and non-ASCII escaped properly) and gives back the same config; values
    from the environment say so."""
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(
        '[chat]\nsystem_prompt = "Say \\"ahoy\\" — then a backslash \\\\ and\\na new line."\n'
        "history = false\n[learning]\nthreshold = 7.5\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "shammah", "--config", str(cfg_file), "config"],
        capture_output=True,
        text=True,
        env=subprocess_env(SHAMMAH_MODEL="Qwen/Qwen2.5-0.5B-Instruct", SHAMMAH_THREADS="3"),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    parsed = tomllib.loads(r.stdout)
    want, _ = load_config(cfg_file, env={"SHAMMAH_MODEL": "Qwen/Qwen2.5-0.5B-Instruct", "SHAMMAH_THREADS": "3"})
    assert from_dict(parsed, env={}) == want
    assert want.chat.system_prompt.startswith('Say "ahoy" —') and want.chat.history is False
    lines = r.stdout.splitlines()
    assert 'base = "Qwen/Qwen2.5-0.5B-Instruct"  # from $SHAMMAH_MODEL' in lines
    assert "threads = 3  # from $SHAMMAH_THREADS" in lines
    assert "threshold = 7.5" in lines  # from the file: no comment
