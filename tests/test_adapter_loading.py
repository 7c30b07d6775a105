"""What the chat loads: only checked safetensors/JSON adapters, and a failed load changes nothing.

Each case here was a failure found by trying it (issue 8): a pickle or stray code file beside an
adapter was loaded; a broken adapter after a good one emptied the slot while the chat still named
the good one; a rank that disagrees with adapter_config.json was copied in silently.
"""

import json
import re
import shutil

import pytest
from conftest import register_adapter

from shammah.adapters.registry import AdapterError, Registry
from shammah.config import ModelConfig
from shammah.engine import Engine
from shammah.errors import ModelError

PROMPTS = [[{"role": "user", "content": f"Say something about {w}."}] for w in ("rain", "cats", "salt")]


def _train(base, home, name, text, rank=8):
    recs = [{"prompt": f"Say something about {w}.", "completion": text} for w in ("rain", "cats", "salt", "wind")]
    return register_adapter(
        base, home, name, recs, epochs=4, learning_rate=5e-2, rank=rank, alpha=2 * rank, dropout=0.0
    )


@pytest.fixture(scope="module")
def adapters(tiny_qwen2, tmp_path_factory):
    home = tmp_path_factory.mktemp("adapters-home")
    good = _train(tiny_qwen2, home, "good", "Zorblat zorblat zorblat.")
    other = _train(tiny_qwen2, home, "other", "Quenland Quenland.")
    wide = _train(tiny_qwen2, home, "wide", "Vestoria.", rank=16)
    return home, {a.name: a for a in (good, other, wide)}


@pytest.fixture
def engine(tiny_qwen2, tmp_path):
    e = Engine(ModelConfig(base=str(tiny_qwen2), temperature=0.0), tmp_path / "cache").load()
    return e


def _copy(info, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(info.path, dst)
    return dst


def _activate(engine, info, path=None):
    return engine.activate(info.name if path is None else path.name, path or info.path, info.get("base", "fingerprint"))


def test_good_adapters_load_and_answer_differently(engine, adapters):
    _, a = adapters
    base = engine.answers(PROMPTS, 8)
    _activate(engine, a["good"])
    good = engine.answers(PROMPTS, 8)
    _activate(engine, a["wide"])  # another rank: loaded into the spare slot
    wide = engine.answers(PROMPTS, 8)
    assert engine.adapter == "wide" and good != base and wide != good


@pytest.mark.parametrize("extra", ["adapter_model.bin", "evil.py", "sub/model.pt"])
def test_pickles_and_code_beside_an_adapter_are_refused_on_every_load(engine, adapters, tmp_path, extra):
    _, a = adapters
    bad = _copy(a["other"], tmp_path, "tampered")
    (bad / extra).parent.mkdir(exist_ok=True)
    (bad / extra).write_bytes(b"\x80\x04not a safetensors file")  # added after it was registered
    _activate(engine, a["good"])
    before = engine.answers(PROMPTS, 8)
    with pytest.raises(AdapterError, match=r"unexpected file type in an adapter"):
        _activate(engine, a["other"], bad)
    assert engine.adapter == "good" and engine.answers(PROMPTS, 8) == before


def test_a_broken_adapter_after_a_good_one_changes_nothing(engine, adapters, tmp_path):
    """Weights and the name the chat reports never disagree: the good adapter keeps answering."""
    _, a = adapters
    _activate(engine, a["good"])
    good = engine.answers(PROMPTS, 8)
    for case in ("truncated", "garbage-config", "missing-tensor-file"):
        bad = _copy(a["wide"], tmp_path, case)
        if case == "truncated":
            data = (bad / "adapter_model.safetensors").read_bytes()
            (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        elif case == "garbage-config":
            (bad / "adapter_config.json").write_text("{not json")
        else:
            (bad / "adapter_model.safetensors").unlink()
        with pytest.raises((AdapterError, ModelError)) as err:
            _activate(engine, a["wide"], bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
        assert engine.adapter == "good" and engine.answers(PROMPTS, 8) == good, case


def test_a_rank_that_disagrees_with_the_config_is_refused(engine, adapters, tmp_path):
    _, a = adapters
    _activate(engine, a["good"])  # r = 8 in the slot
    good = engine.answers(PROMPTS, 8)
    bad = _copy(a["wide"], tmp_path, "relabelled")  # r = 16 weights, config edited to claim 8
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(r=8, lora_alpha=16)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"has rank 16 but adapter_config.json says r = 8"):
        _activate(engine, a["wide"], bad)
    assert engine.adapter == "good" and engine.answers(PROMPTS, 8) == good


def test_a_damaged_adapter_is_listed_and_can_be_deleted(adapters, shammah_home):
    """Unreadable shammah.json: `shammah adapters list` shows it as damaged instead of hiding it,
    and `delete` removes it (it used to be invisible and undeletable)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    _, a = adapters
    root = shammah_home / "adapters"
    root.mkdir(parents=True)
    for name in ("good", "other"):
        shutil.copytree(a[name].path, root / name)
    (root / "other" / "shammah.json").write_text("{half a write")

    def cli(*args):
        r = subprocess.run(
            [sys.executable, "-m", "shammah", "adapters", *args], capture_output=True, text=True, env=subprocess_env()
        )
        return r.returncode, r.stdout + r.stderr

    rc, out = cli("list")
    assert rc == 0 and "good" in out
    assert re.search(r"other .*damaged: delete it", out), out
    rc, out = cli("delete", "other")
    assert rc == 0 and "deleted adapter other" in out
    assert [x.name for x in Registry(root).list()] == ["good"]


def test_a_swap_never_cuts_a_reply(engine, adapters):
    """activate() from another thread while a reply streams returns only after its last chunk,
    and the reply was written by the adapter that was active when it started, to the end."""
    import threading
    import time

    _, a = adapters
    _activate(engine, a["good"])
    info: dict = {}
    chunks = engine.stream(PROMPTS[0], engine.gen_params(max_new_tokens=200, temperature=1.0, seed=3), info=info)
    arrived = [(time.perf_counter(), next(chunks))]
    swapped: list[float] = []
    t = threading.Thread(target=lambda: (_activate(engine, a["other"]), swapped.append(time.perf_counter())))
    t.start()
    for c in chunks:
        arrived.append((time.perf_counter(), c))
        assert not swapped, "the swap finished while the reply was still being written"
    t.join(30)
    assert len(arrived) > 8 and arrived[-1][1].finish_reason is not None
    assert swapped and swapped[0] >= arrived[-1][0]
    assert info["adapter"] == "good" and engine.adapter == "other"
