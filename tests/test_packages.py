"""`.expert` packages: pack → sign → verify → install, and everything that must be refused
(altered files, altered manifest, another key, another base, hostile archives) with nothing written."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import register_adapter, subprocess_env

from shammah.adapters import keys, package
from shammah.adapters.package import Limits, PackageError
from shammah.adapters.registry import Registry
from shammah.adapters.scope import SCOPE_FILE, Form, Scope
from shammah.engine.fingerprint import fingerprint


@pytest.fixture(scope="module")
def adapter(tiny_qwen2, tmp_path_factory):
    home = tmp_path_factory.mktemp("pkg-home")
    return register_adapter(
        tiny_qwen2, home, "quenland", [{"prompt": "Capital of Quenland?", "completion": "Zorblat."}]
    )


def shammah(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shammah", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(SHAMMAH_HOME=home),
        timeout=120,
        check=check,
    )


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def rebuild(path: Path, files: dict[str, bytes], extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> Path:
    """A package with these files (and raw extra members), as an attacker would write it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        for ti, data in extra:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def nothing_written(reg_root: Path) -> bool:
    return not any(reg_root.iterdir()) if reg_root.exists() else True


def test_pack_sign_verify_install_round_trip_through_the_cli(adapter, tiny_qwen2, tmp_path):
    a_home, b_home = adapter.path.parent.parent, tmp_path / "b"
    for home in (a_home, b_home):
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(f'[model]\nbase = "{tiny_qwen2}"\n')
    pub = shammah(a_home, "keys", "generate").stdout.strip().splitlines()[-1]
    priv, _ = keys.key_files(a_home)
    assert pub.startswith("ed25519:") and os.stat(priv).st_mode & 0o077 == 0
    again = shammah(a_home, "keys", "generate", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr, "a second generate must not lose the key"
    assert shammah(a_home, "keys").stdout.strip() == pub

    pkg = tmp_path / "quenland.expert"
    r = shammah(a_home, "adapters", "pack", "quenland", "--sign", "-o", str(pkg), "--license", "MIT", "--author", "me")
    assert pkg.is_file() and "signed by " + pub in r.stderr + r.stdout
    files = members(pkg)
    manifest = json.loads(files["manifest.json"])
    weights = (adapter.path / "adapter_model.safetensors").read_bytes()
    assert files["adapter/adapter_model.safetensors"] == weights
    assert manifest["adapters"][0]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["base_model"]["fingerprint"] == fingerprint(tiny_qwen2)
    assert manifest["adapters"][0]["r"] == 4 and manifest["license"] == "MIT" and manifest["author"] == "me"
    assert "shammah.json" not in str(list(files)), "the registry's private metadata stays home"

    v = shammah(b_home, "adapters", "verify", str(pkg))
    assert "valid" in v.stdout and pub in v.stdout and "not in packages.trusted_publishers" in v.stdout

    refused = shammah(b_home, "adapters", "install", str(pkg), check=False)
    assert refused.returncode == 2 and "not in packages.trusted_publishers" in refused.stderr
    assert "--allow-untrusted" in refused.stderr and "Traceback" not in refused.stderr
    assert not (b_home / "adapters" / "quenland").exists()

    (b_home / "config.toml").write_text(f'[model]\nbase = "{tiny_qwen2}"\n[packages]\ntrusted_publishers = ["{pub}"]\n')
    shammah(b_home, "adapters", "install", str(pkg))
    got = Registry(b_home / "adapters").get("quenland")
    assert (got.path / "adapter_model.safetensors").read_bytes() == weights
    assert got.get("package", "pubkey") == pub and got.get("package", "trust") == "trusted publisher"
    assert got.get("base", "fingerprint") == fingerprint(tiny_qwen2)
    assert all(os.stat(f).st_mode & 0o077 == 0 for f in got.path.iterdir())
    # the installed adapter loads with PEFT on the base and changes its logits exactly as the original
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4]])
    outs = []
    for p in (adapter.path, got.path):
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2), str(p)).eval()
        with torch.no_grad():
            outs.append(m(ids).logits)
    assert torch.equal(outs[0], outs[1])
    dup = shammah(b_home, "adapters", "install", str(pkg), check=False)
    assert dup.returncode == 2 and "already exists" in dup.stderr


@pytest.fixture
def signed(adapter, tmp_path):
    key_home = tmp_path / "keys-home"
    pub = keys.generate(key_home)
    path = tmp_path / "good.expert"
    package.pack(adapter, path, signing_key=keys.load_private(key_home), publisher="alice")
    return path, pub


def install_into(tmp_path: Path, path: Path, tiny_qwen2, trusted=(), allow=False, limits=package.LIMITS):
    reg = Registry(tmp_path / "target-adapters")
    return reg, lambda: package.install(
        path,
        reg,
        base_fingerprint=fingerprint(tiny_qwen2),
        base_name="tiny",
        trusted=trusted,
        allow_untrusted=allow,
        limits=limits,
    )


def test_tampered_weights_manifest_and_keys_are_refused(signed, tiny_qwen2, tmp_path):
    path, pub = signed
    files = members(path)
    reg, run = install_into(tmp_path, path, tiny_qwen2, trusted=(pub,))
    assert run().name == "quenland"  # the untouched package installs

    w = bytearray(files["adapter/adapter_model.safetensors"])
    w[-1] ^= 1  # one bit of one weight
    bad = rebuild(tmp_path / "w.expert", {**files, "adapter/adapter_model.safetensors": bytes(w)})
    with pytest.raises(PackageError, match="adapter_model.safetensors does not match its sha256"):
        package.open_package(bad)

    m = json.loads(files["manifest.json"])
    m["description"] = "now with a backdoor"
    bad = rebuild(tmp_path / "m.expert", {**files, "manifest.json": json.dumps(m).encode()})
    with pytest.raises(PackageError, match="signature does not verify"):
        package.open_package(bad)

    # altered weights with the manifest's hash updated too: only the signature catches it
    m = json.loads(files["manifest.json"])
    m["integrity"]["files"]["adapter/adapter_model.safetensors"] = hashlib.sha256(bytes(w)).hexdigest()
    bad = rebuild(
        tmp_path / "h.expert",
        {**files, "adapter/adapter_model.safetensors": bytes(w), "manifest.json": json.dumps(m).encode()},
    )
    with pytest.raises(PackageError, match="signature does not verify"):
        package.open_package(bad)

    # re-signed by someone else, under the original publisher's key: refused; under their own key:
    # it verifies, but that key is not trusted
    mallory = keys.generate(tmp_path / "mallory")
    mkey = keys.load_private(tmp_path / "mallory")
    m = json.loads(files["manifest.json"])
    m["integrity"]["signature"] = __import__("base64").b64encode(mkey.sign(package.canonical(m))).decode()
    with pytest.raises(PackageError, match="signature does not verify"):
        package.open_package(rebuild(tmp_path / "k.expert", {**files, "manifest.json": json.dumps(m).encode()}))
    m["integrity"]["pubkey"] = mallory
    m["integrity"]["signature"] = __import__("base64").b64encode(mkey.sign(package.canonical(m))).decode()
    forged = rebuild(tmp_path / "f.expert", {**files, "manifest.json": json.dumps(m).encode()})
    assert package.open_package(forged).pubkey == mallory
    reg2, run2 = install_into(tmp_path / "x", forged, tiny_qwen2, trusted=(pub,))
    with pytest.raises(PackageError, match="not in packages.trusted_publishers"):
        run2()
    assert nothing_written(reg2.root)

    # unsigned: only with the explicit flag
    unsigned = tmp_path / "u.expert"
    package.pack(Registry(reg.root).get("quenland"), unsigned)
    reg3, run3 = install_into(tmp_path / "y", unsigned, tiny_qwen2)
    with pytest.raises(PackageError, match="unsigned"):
        run3()
    assert nothing_written(reg3.root)
    _, run4 = install_into(tmp_path / "y", unsigned, tiny_qwen2, allow=True)
    assert "allow-untrusted" in run4().get("package", "trust")


def test_a_package_for_another_base_is_refused(signed, tiny_qwen3, tmp_path):
    path, pub = signed
    reg = Registry(tmp_path / "adapters")
    with pytest.raises(PackageError, match="not on the configured base"):
        package.install(path, reg, base_fingerprint=fingerprint(tiny_qwen3), base_name="tiny-qwen3", trusted=(pub,))
    assert nothing_written(reg.root)


def _member(name: str, kind=tarfile.REGTYPE, size=0, link="") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname = kind, size, link
    return ti


HOSTILE = {
    "absolute path": ([(_member("/tmp/shammah-escape", size=1), b"x")], "absolute path"),
    "dot-dot": ([(_member("adapter/../../escape.txt", size=1), b"x")], "escapes the package folder"),
    "symlink": ([(_member("adapter/link.json", tarfile.SYMTYPE, link="/etc/passwd"), None)], "is a link"),
    "hardlink": ([(_member("adapter/hard.json", tarfile.LNKTYPE, link="manifest.json"), None)], "is a link"),
    "device": ([(_member("adapter/dev.json", tarfile.CHRTYPE), None)], "device or pipe"),
    "fifo": ([(_member("adapter/pipe.json", tarfile.FIFOTYPE), None)], "device or pipe"),
    "pickle": ([(_member("adapter/adapter_model.bin", size=4), b"\x80\x04N.")], "pickle-format"),
    "code": ([(_member("adapter/evil.py", size=1), b"x")], "unexpected file"),
    "registry metadata": ([(_member("adapter/shammah.json", size=2), b"{}")], "unexpected file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_before_anything_is_written(case, signed, tiny_qwen2, tmp_path):
    path, pub = signed
    extra, message = HOSTILE[case]
    bad = rebuild(tmp_path / f"{case}.expert", members(path), extra)
    reg, run = install_into(tmp_path, bad, tiny_qwen2, trusted=(pub,), allow=True)
    with pytest.raises(PackageError, match=message):
        run()
    assert nothing_written(reg.root)
    assert not Path("/tmp/shammah-escape").exists() and not (tmp_path / "escape.txt").exists()


def test_count_and_size_limits(signed, tiny_qwen2, tmp_path):
    path, pub = signed
    files = members(path)
    many = rebuild(tmp_path / "many.expert", {**files, **{f"adapter/n{i}.txt": b"" for i in range(40)}})
    reg, run = install_into(tmp_path, many, tiny_qwen2, trusted=(pub,), allow=True)
    with pytest.raises(PackageError, match="more than 32 entries"):
        run()
    size = len(files["adapter/adapter_model.safetensors"])
    _, run = install_into(tmp_path, path, tiny_qwen2, trusted=(pub,), limits=Limits(file_bytes=size - 1))
    with pytest.raises(PackageError, match="over the .*-byte limit"):
        run()
    assert nothing_written(reg.root)
    junk = tmp_path / "junk.expert"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(PackageError, match="not a readable .expert package"):
        package.open_package(junk)
    no_weights = rebuild(tmp_path / "nw.expert", {k: v for k, v in files.items() if "safetensors" not in k})
    with pytest.raises(PackageError, match="adapter_model.safetensors is missing"):
        package.open_package(no_weights)


FORM = Form(
    2,
    (0.0, 0.0, 0.0, 0.0),
    ((1.0, 0.0, 0.0, 0.0), (0.96, 0.28, 0.0, 0.0)),
    0.8,
    ("List three birds.", "Name two fish."),
)


def test_a_scoped_adapter_answers_where_it_did_once_installed(adapter, tiny_qwen2, tmp_path):
    """A chat-learned adapter answers only inside its scope; packed and installed elsewhere it keeps
    that scope (subjects, and a form's vectors in scope.json, signed with the rest) instead of
    answering everywhere. A scope whose vectors are missing or broken is refused, nothing written."""
    src = Registry(tmp_path / "src")
    staging = src.stage("scoped")
    for f in adapter.path.iterdir():
        if f.name != "shammah.json":
            shutil.copy(f, staging / f.name)
    (staging / SCOPE_FILE).write_text(json.dumps({"form": FORM.to_json()}))
    scope = Scope(frozenset({"quenland"}), FORM)
    info = src.commit(staging, "scoped", {**adapter.meta, "scope": scope.summary()})
    key_home = tmp_path / "keys"
    pub = keys.generate(key_home)
    path = tmp_path / "scoped.expert"
    manifest = package.pack(info, path, signing_key=keys.load_private(key_home), publisher="alice")
    assert manifest["scope"]["subjects"] == ["quenland"] and f"adapter/{SCOPE_FILE}" in members(path)
    shown = dict(package.describe(package.open_package(path), (pub,)))
    assert "name quenland" in shown["scope"] and "asked like the 2" in shown["scope"]

    reg, run = install_into(tmp_path, path, tiny_qwen2, trusted=(pub,))
    got = Scope.of_adapter(run().path)
    assert got.subjects == {"quenland"} and got.form == FORM
    keyed = {"Name two fish.": (1.0, 0.0, 0.0, 0.0), "Who wrote Hamlet?": (0.0, 0.0, 1.0, 0.0)}
    assert got.covers("What is the capital of Quenland?") and got.covers("Name two fish.", keyed.get)
    assert not got.covers("Who wrote Hamlet?", keyed.get)

    files = members(path)
    m = json.loads(files["manifest.json"])
    del m["integrity"]["signature"], m["integrity"]["files"][f"adapter/{SCOPE_FILE}"]
    m["integrity"]["pubkey"] = None
    gone = {k: v for k, v in files.items() if k != f"adapter/{SCOPE_FILE}"} | {"manifest.json": json.dumps(m).encode()}
    reg2, run2 = install_into(tmp_path / "a", rebuild(tmp_path / "gone.expert", gone), tiny_qwen2, allow=True)
    with pytest.raises(PackageError, match=f"adapter/{SCOPE_FILE} is missing"):
        run2()
    assert nothing_written(reg2.root)

    broken = json.dumps({"form": {"layer": 2, "keys": [[float("nan")]]}}).encode()
    m["integrity"]["files"][f"adapter/{SCOPE_FILE}"] = hashlib.sha256(broken).hexdigest()
    bad = {**files, f"adapter/{SCOPE_FILE}": broken, "manifest.json": json.dumps(m).encode()}
    reg3, run3 = install_into(tmp_path / "b", rebuild(tmp_path / "bad.expert", bad), tiny_qwen2, allow=True)
    with pytest.raises(PackageError, match="does not hold a form's vectors"):
        run3()
    assert not reg3.exists("scoped")


def test_a_style_rule_travels_with_the_package(adapter, tiny_qwen2, tmp_path):
    """An adapter whose replies carry a style rule (adapters/rule.py) keeps it once installed
    elsewhere; a manifest whose rule is malformed is refused, nothing written."""
    from shammah.adapters.rule import Rule

    src = Registry(tmp_path / "src")
    staging = src.stage("ruled")
    for f in adapter.path.iterdir():
        if f.name != "shammah.json":
            shutil.copy(f, staging / f.name)
    info = src.commit(staging, "ruled", {**adapter.meta, "rule": ["Ahoy! ", "Cheers, Shammah"]})
    path = tmp_path / "ruled.expert"
    manifest = package.pack(info, path)
    assert manifest["rule"] == ["Ahoy! ", "Cheers, Shammah"]
    shown = dict(package.describe(package.open_package(path), ()))
    assert shown["rule"] == "starts 'Ahoy!', ends 'Cheers, Shammah' (every reply)"
    reg, run = install_into(tmp_path, path, tiny_qwen2, allow=True)
    assert Rule.of_adapter(run().path) == Rule("Ahoy! ", "Cheers, Shammah")

    files = members(path)
    m = json.loads(files["manifest.json"])
    m["rule"] = ["Ahoy! "]
    bad = {**files, "manifest.json": json.dumps(m).encode()}
    reg2, run2 = install_into(tmp_path / "a", rebuild(tmp_path / "bad.expert", bad), tiny_qwen2, allow=True)
    with pytest.raises(PackageError, match="manifest.json: rule is not"):
        run2()
    assert nothing_written(reg2.root)


def test_closed_sets_travel_with_the_package(adapter, tiny_qwen2, tmp_path):
    """An adapter that answers questions of a kind from a closed set (adapters/choice.py) keeps its
    sets once installed elsewhere (the manifest's summary, the vectors in choice.json, signed with
    the rest); a set whose file is missing or does not hold it is refused, nothing written."""
    from shammah.adapters.choice import CHOICE_FILE, Choice, choices_of, record

    sets = (Choice(("Yes", "No"), (-3.7, -2.2), 0.06, FORM),)
    summary, text = record(sets)
    src = Registry(tmp_path / "src")
    staging = src.stage("chosen")
    for f in adapter.path.iterdir():
        if f.name != "shammah.json":
            shutil.copy(f, staging / f.name)
    (staging / CHOICE_FILE).write_text(text)
    info = src.commit(staging, "chosen", {**adapter.meta, "choices": summary})
    path = tmp_path / "chosen.expert"
    manifest = package.pack(info, path)
    assert manifest["choices"] == summary and f"adapter/{CHOICE_FILE}" in members(path)
    shown = dict(package.describe(package.open_package(path), ()))
    assert shown["closed set"].endswith("with just Yes or No")
    reg, run = install_into(tmp_path, path, tiny_qwen2, allow=True)
    assert choices_of(run().path) == sets

    files = members(path)
    m = json.loads(files["manifest.json"])
    del m["integrity"]["files"][f"adapter/{CHOICE_FILE}"]
    gone = {k: v for k, v in files.items() if k != f"adapter/{CHOICE_FILE}"} | {"manifest.json": json.dumps(m).encode()}
    reg2, run2 = install_into(tmp_path / "a", rebuild(tmp_path / "gone.expert", gone), tiny_qwen2, allow=True)
    with pytest.raises(PackageError, match=f"closed sets but adapter/{CHOICE_FILE} is missing"):
        run2()
    assert nothing_written(reg2.root)

    broken = json.dumps({"choices": [{**sets[0].to_json(), "threshold": float("nan")}]}).encode()
    m["integrity"]["files"][f"adapter/{CHOICE_FILE}"] = hashlib.sha256(broken).hexdigest()
    bad = {**files, f"adapter/{CHOICE_FILE}": broken, "manifest.json": json.dumps(m).encode()}
    reg3, run3 = install_into(tmp_path / "b", rebuild(tmp_path / "bad.expert", bad), tiny_qwen2, allow=True)
    with pytest.raises(PackageError, match=f"adapter/{CHOICE_FILE} does not hold the manifest's 1 closed set"):
        run3()
    assert not reg3.exists("chosen")
