"""``.expert`` packages: an adapter that travels, with proof of who made it.

A package is a gzipped tar holding exactly::

    manifest.json                       what it is, for which base, how it was trained, file hashes
    LICENSE                             the license text
    adapter/adapter_config.json         the PEFT adapter, as the registry keeps it
    adapter/adapter_model.safetensors
    adapter/README.md                   PEFT's model card (when the adapter has one)
    adapter/scope.json                  a form scope's vectors (when the adapter has one)
    adapter/choice.json                 its closed sets of answers (adapters/choice.py; when it has any)

An adapter learned in the chat answers only inside its scope (adapters/scope.py): the manifest's
``scope`` carries it (subjects, and a form's summary whose vectors are scope.json), so an installed
package answers where it answered on the machine that learned it, not everywhere. Its style rule
(``rule``) and closed sets of answers (``choices``, the vectors in choice.json) travel likewise. All
are signed with the rest.

``integrity.files`` in the manifest lists the sha256 of every other file; a signed package
carries the publisher's ed25519 public key and a signature over the canonical manifest (sorted
keys, no whitespace, ``integrity.signature`` left out), so the signature covers every file
through its hash and every manifest field.

Opening a package never trusts it: every member is checked (a regular file at an allowed path:
no absolute path, no ``..``, no link or device, no pickle, within count and size limits) before
one byte is written, and tarfile's extraction is never used: each file is streamed to a path we
build, its size capped and its hash checked.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from shammah.adapters import keys
from shammah.adapters.choice import CHOICE_FILE, Choice, describe_recorded
from shammah.adapters.registry import ALLOWED_SUFFIXES, AdapterError, AdapterInfo, Registry, check_lora, verify_files
from shammah.adapters.rule import Rule
from shammah.adapters.scope import SCOPE_FILE, Form, describe_summary
from shammah.errors import ShammahError

FORMAT = "shammah.expert/1"
MANIFEST, LICENSE = "manifest.json", "LICENSE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
FINGERPRINT_METHOD = "shammah-sampled-sha256/1"  # engine.fingerprint: headers + 64 samples of the weights


@dataclass(frozen=True)
class Limits:
    files: int = 32
    file_bytes: int = 8 << 30  # one adapter file (a rank-64 LoRA of a 7B model is ~0.6 GB)
    total_bytes: int = 16 << 30
    manifest_bytes: int = 1 << 20


LIMITS = Limits()


class PackageError(ShammahError):
    """A package that is malformed, altered, hostile or not trusted."""


def canonical(manifest: dict) -> bytes:
    """The bytes a signature covers: the manifest without its signature, canonical JSON."""
    m = json.loads(json.dumps(manifest))
    m.get("integrity", {}).pop("signature", None)
    return json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- pack --------------------------------------------------------------------------------------
def pack(
    info: AdapterInfo,
    out: Path,
    *,
    version: str = "1.0.0",
    description: str = "",
    author: str = "",
    license_name: str = "unspecified",
    license_text: str | None = None,
    keywords: tuple[str, ...] = (),
    priority: int = 0,
    signing_key=None,
    publisher: str = "",
) -> dict:
    """Write ``info``'s adapter as a package at ``out`` (atomically); returns the manifest."""
    cfg = check_adapter_dir(info.path)
    scope = info.get("scope")
    names = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    if isinstance(scope, dict) and isinstance(scope.get("form"), dict):
        names.append(SCOPE_FILE)
    choices = info.get("choices") if isinstance(info.get("choices"), list) and info.get("choices") else None
    if choices:
        names.append(CHOICE_FILE)
    files = {f"adapter/{n}": info.path / n for n in names}
    files = {k: p for k, p in files.items() if p.is_file()}
    license_bytes = (license_text if license_text is not None else f"License: {license_name}\n").encode()
    hashes = {k: _sha256_file(p) for k, p in files.items()}
    hashes[LICENSE] = hashlib.sha256(license_bytes).hexdigest()
    hp = info.get("hyperparameters", default={}) or {}
    report = info.get("report", default={}) or {}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": info.name,
        "version": version,
        "description": description,
        "author": author,
        "base_model": {
            "id": info.get("base", "id"),
            "name": info.get("base", "name"),
            "fingerprint": info.get("base", "fingerprint"),
            "fingerprint_method": FINGERPRINT_METHOD,
            "quantization": hp.get("quantization") or "none",
        },
        "adapters": [
            {
                "type": str(cfg.get("peft_type", "")).lower(),
                "use_dora": bool(cfg.get("use_dora", False)),
                "target_modules": sorted(cfg.get("target_modules") or []),
                "r": cfg.get("r"),
                "alpha": cfg.get("lora_alpha"),
                "dropout": cfg.get("lora_dropout"),
                "path": "adapter/",
                "size_bytes": files["adapter/adapter_model.safetensors"].stat().st_size,
                "sha256": hashes["adapter/adapter_model.safetensors"],
            }
        ],
        "capabilities": ["chat"],
        "scope": scope if isinstance(scope, dict) else None,
        "rule": rule.record() if (rule := Rule.recorded(info.get("rule"))) else None,
        "choices": choices,
        "routing": {"keywords": list(keywords), "priority": priority},
        "training": {
            "dataset": info.get("dataset_hash"),
            "method": info.get("method"),
            "epochs": hp.get("epochs"),
            "learning_rate": hp.get("learning_rate"),
            "examples": report.get("examples"),
            "final_train_loss": report.get("final_train_loss"),
            "trained_on": time.strftime("%Y-%m-%d", time.gmtime(info.meta.get("created", 0))),
        },
        "license": license_name,
        "integrity": {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "publisher": publisher or None,
            "files": dict(sorted(hashes.items())),
            "pubkey": keys.public_of(signing_key) if signing_key is not None else None,
        },
    }
    if signing_key is not None:
        manifest["integrity"]["signature"] = base64.b64encode(signing_key.sign(canonical(manifest))).decode()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            # mtime 0 and no owner names: the same adapter and manifest give the same bytes
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
                _add(tar, MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
                _add(tar, LICENSE, license_bytes)
                for arc, p in files.items():
                    _add(tar, arc, p.read_bytes())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
    tar.addfile(ti, io.BytesIO(data))


def check_adapter_dir(path: Path) -> dict:
    """The adapter's config, after the registry's file checks (LoRA-family: shapes vs rank too)."""
    verify_files(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    return check_lora(path) if cfg.get("peft_type") == "LORA" else cfg


# --- open and verify --------------------------------------------------------------------------
@dataclass
class Package:
    path: Path
    manifest: dict
    hashes: dict[str, str]  # of the files as read
    signed: bool = False
    pubkey: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def publisher(self) -> str:
        who = self.manifest.get("integrity", {}).get("publisher") or "(no name)"
        return f"{who} [{self.pubkey}]" if self.pubkey else f"{who} [unsigned]"


def _check_member(m: tarfile.TarInfo, where: str) -> str:
    """Why this member is refused, or its normalized name."""
    name = m.name
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise PackageError(f"{where}: {name!r} is an absolute path; refusing the package")
    if ".." in p.parts or "\\" in name:
        raise PackageError(f"{where}: {name!r} escapes the package folder; refusing the package")
    if m.issym() or m.islnk():
        raise PackageError(f"{where}: {name!r} is a link; refusing the package")
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        raise PackageError(f"{where}: {name!r} is a device or pipe; refusing the package")
    norm = "/".join(x for x in p.parts if x not in ("", "."))
    if m.isdir():
        if norm not in ("", "adapter"):
            raise PackageError(f"{where}: unexpected folder {name!r}; refusing the package")
        return ""
    if not m.isfile():
        raise PackageError(f"{where}: {name!r} is not a regular file; refusing the package")
    if norm.lower().endswith(PICKLE_SUFFIXES):
        raise PackageError(f"{where}: {name!r} is a pickle-format file (code can hide in it); refusing the package")
    parts = norm.split("/")
    ok = norm in (MANIFEST, LICENSE) or (
        len(parts) == 2 and parts[0] == "adapter" and parts[1].endswith(ALLOWED_SUFFIXES) and parts[1] != "shammah.json"
    )
    if not ok:
        raise PackageError(f"{where}: unexpected file {name!r} (a package holds manifest.json, LICENSE, adapter/*)")
    return norm


def _scan(path: Path, limits: Limits) -> dict[str, tarfile.TarInfo]:
    """Every member checked, nothing written: {name: member}."""
    where = str(path)
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            count = 0
            while (m := tar.next()) is not None:
                count += 1
                if count > limits.files:
                    raise PackageError(f"{where}: more than {limits.files} entries; refusing the package")
                name = _check_member(m, where)
                if not name:
                    continue
                if name in members:
                    raise PackageError(f"{where}: {name!r} appears twice; refusing the package")
                cap = limits.manifest_bytes if name == MANIFEST else limits.file_bytes
                if m.size > cap:
                    raise PackageError(f"{where}: {name!r} is {m.size} bytes, over the {cap}-byte limit")
                total += m.size
                if total > limits.total_bytes:
                    raise PackageError(f"{where}: over {limits.total_bytes} bytes in all; refusing the package")
                members[name] = m
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PackageError(f"{where}: not a readable .expert package ({e})") from None
    for need in (MANIFEST, "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        if need not in members:
            raise PackageError(f"{where}: {need} is missing; not a complete .expert package")
    return members


def _stream(path: Path, members: dict[str, tarfile.TarInfo], dest: Path | None) -> tuple[dict[str, str], bytes]:
    """Hash every file (and write it under ``dest`` when given); returns (hashes, manifest bytes)."""
    hashes, manifest = {}, b""
    with tarfile.open(path, "r:gz") as tar:
        for name, m in members.items():
            src = tar.extractfile(m)
            if src is None:
                raise PackageError(f"{path}: {name!r} cannot be read")
            h = hashlib.sha256()
            out = None
            if dest is not None and name != MANIFEST:
                target = dest / ("LICENSE.txt" if name == LICENSE else PurePosixPath(name).name)
                out = open(target, "xb")  # noqa: SIM115 - closed below; "x": never through an existing path
                os.chmod(target, 0o600)
            try:
                left = m.size
                while left > 0:
                    block = src.read(min(left, 1 << 20))
                    if not block:
                        raise PackageError(f"{path}: {name!r} is truncated")
                    left -= len(block)
                    h.update(block)
                    if name == MANIFEST:
                        manifest += block
                    if out is not None:
                        out.write(block)
            finally:
                if out is not None:
                    out.close()
            hashes[name] = h.hexdigest()
    return hashes, manifest


def _manifest(path: Path, raw: bytes) -> dict:
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"{path}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PackageError(f"{path}: manifest.json is not a {FORMAT} manifest (format = {m.get('format')!r})")
    problems = []
    for key, typ in (("name", str), ("version", str), ("base_model", dict), ("adapters", list), ("integrity", dict)):
        if not isinstance(m.get(key), typ):
            problems.append(f"{key} missing or not a {typ.__name__}")
    files = m.get("integrity", {}).get("files") if isinstance(m.get("integrity"), dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        problems.append("integrity.files missing or not a name -> sha256 map")
    if problems:
        raise PackageError(f"{path}: manifest.json: {'; '.join(problems)}")
    return m


def open_package(path: Path, dest: Path | None = None, limits: Limits = LIMITS) -> Package:
    """Check the archive, hash its files (writing them into ``dest`` when given), and verify the
    hashes and the signature against the manifest. Raises PackageError on anything amiss."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{path}: no such package file")
    members = _scan(path, limits)
    hashes, raw = _stream(path, members, dest)
    manifest = _manifest(path, raw)
    listed = manifest["integrity"]["files"]
    got = {k: v for k, v in hashes.items() if k != MANIFEST}
    if set(listed) != set(got):
        extra, missing = sorted(set(got) - set(listed)), sorted(set(listed) - set(got))
        raise PackageError(f"{path}: files differ from the manifest (unlisted: {extra}, missing: {missing})")
    for name, digest in sorted(got.items()):
        if listed[name] != digest:
            raise PackageError(f"{path}: {name} does not match its sha256 in the manifest: the package was altered")
    pkg = Package(path, manifest, hashes)
    sig, pub = manifest["integrity"].get("signature"), manifest["integrity"].get("pubkey")
    if sig is None:
        if pub is not None:
            raise PackageError(f"{path}: the manifest names a publisher key but carries no signature")
        return pkg
    key = keys.parse_public(pub)
    try:
        from cryptography.exceptions import InvalidSignature

        key.verify(base64.b64decode(sig, validate=True), canonical(manifest))
    except (InvalidSignature, ValueError):
        raise PackageError(
            f"{path}: the signature does not verify: the manifest or a file was altered after signing, "
            "or it was signed with another key"
        ) from None
    pkg.signed, pkg.pubkey = True, pub
    return pkg


# --- install -----------------------------------------------------------------------------------
def trust(pkg: Package, trusted: tuple[str, ...], allow_untrusted: bool) -> str:
    """Refuse an unsigned or unknown-publisher package unless allowed; returns how it is trusted."""
    if pkg.signed and pkg.pubkey in trusted:
        return "trusted publisher"
    what = "unsigned" if not pkg.signed else f"signed by {pkg.pubkey}, a key not in packages.trusted_publishers"
    if not allow_untrusted:
        raise PackageError(
            f"{pkg.path}: the package is {what}; add the publisher's key to packages.trusted_publishers "
            "if you trust it, or install with --allow-untrusted"
        )
    return f"{what} (installed with --allow-untrusted)"


def install(
    path: Path,
    registry: Registry,
    *,
    base_fingerprint: str,
    base_name: str,
    trusted: tuple[str, ...] = (),
    allow_untrusted: bool = False,
    name: str | None = None,
    limits: Limits = LIMITS,
) -> AdapterInfo:
    """Verify, check trust and base, then register the adapter (atomically: all or nothing)."""
    pkg = open_package(path, None, limits)  # everything is checked before anything is written
    how = trust(pkg, trusted, allow_untrusted)
    base = pkg.manifest["base_model"]
    if base.get("fingerprint") != base_fingerprint:
        raise PackageError(
            f"{path}: the adapter was trained on {base.get('id') or base.get('name')} (fingerprint "
            f"{base.get('fingerprint')}), not on the configured base {base_name} ({base_fingerprint}); "
            "set model.base to that model to install it"
        )
    name = name or pkg.manifest["name"]
    staging = registry.stage(name)
    try:
        again = open_package(path, staging, limits)  # written now; the hashes checked again as written
        if again.hashes != pkg.hashes:
            raise PackageError(f"{path}: the file changed while it was being installed")
        check_adapter_dir(staging)
        m = pkg.manifest
        scope = _scope(pkg, staging)
        meta = {
            "scope": scope,
            "rule": _rule(pkg),
            "choices": _choices(pkg, staging),
            "base": {**base, "installed_on": base_name},
            "method": m.get("training", {}).get("method"),
            "adapter_type": (m["adapters"][0].get("type") if m["adapters"] else None),
            "report": {k: v for k, v in m.get("training", {}).items() if k in ("examples", "final_train_loss")},
            "package": {
                "file": str(Path(path).resolve()),
                "sha256": _sha256_file(Path(path)),
                "version": m.get("version"),
                "description": m.get("description"),
                "author": m.get("author"),
                "license": m.get("license"),
                "publisher": m["integrity"].get("publisher"),
                "pubkey": pkg.pubkey,
                "trust": how,
                "installed": time.time(),
            },
        }
        return registry.commit(staging, name, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _scope(pkg: Package, staging: Path | None) -> dict | None:
    """The manifest's scope summary, checked (and its form's vectors in ``staging``, when given)."""
    scope = pkg.manifest.get("scope")
    if scope is None:
        return None
    ok = isinstance(scope, dict)
    subjects, form = (scope.get("subjects"), scope.get("form")) if ok else (None, None)
    if (
        not ok
        or not (subjects is None or (isinstance(subjects, list) and all(isinstance(x, str) for x in subjects)))
        or not (form is None or (isinstance(form, dict) and form.get("file") == SCOPE_FILE))
    ):
        raise PackageError(f"{pkg.path}: manifest.json: scope is not a shammah scope (subjects, form)")
    if form is not None:
        if f"adapter/{SCOPE_FILE}" not in pkg.hashes:
            raise PackageError(f"{pkg.path}: the manifest's scope has a form but adapter/{SCOPE_FILE} is missing")
        if staging is not None:
            try:
                vectors = json.loads((staging / SCOPE_FILE).read_text()).get("form")
            except (OSError, ValueError, AttributeError):
                vectors = None
            if Form.from_json(vectors) is None:
                raise PackageError(f"{pkg.path}: adapter/{SCOPE_FILE} does not hold a form's vectors")
    return scope


def _rule(pkg: Package) -> list[str] | None:
    """The manifest's style rule (adapters/rule.py), checked: the engine writes it on every reply."""
    value = pkg.manifest.get("rule")
    if value is None:
        return None
    rule = Rule.recorded(value)
    if rule is None:
        raise PackageError(
            f"{pkg.path}: manifest.json: rule is not [opening, closing], [opening, closing, sentences] or [opening, closing, sentences, marks] (two strings, a length of 0-2 and a list of digits/bold marks, not all empty)"
        )
    return rule.record()


def _choices(pkg: Package, staging: Path | None) -> list[dict] | None:
    """The manifest's closed sets of answers (adapters/choice.py), checked, with their vectors in
    ``staging`` when given: the engine answers by them."""
    value = pkg.manifest.get("choices")
    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(c, dict)
            and isinstance(c.get("answers"), list)
            and all(isinstance(a, str) for a in c["answers"])
            and c.get("file") == CHOICE_FILE
            for c in value
        )
    )
    if not ok:
        raise PackageError(f"{pkg.path}: manifest.json: choices is not a list of shammah closed sets (answers, file)")
    if f"adapter/{CHOICE_FILE}" not in pkg.hashes:
        raise PackageError(f"{pkg.path}: the manifest has closed sets but adapter/{CHOICE_FILE} is missing")
    if staging is not None:
        try:
            saved = json.loads((staging / CHOICE_FILE).read_text()).get("choices")
        except (OSError, ValueError, AttributeError):
            saved = None
        sets = [Choice.from_json(d) for d in saved] if isinstance(saved, list) else []
        if len(sets) != len(value) or None in sets:
            raise PackageError(
                f"{pkg.path}: adapter/{CHOICE_FILE} does not hold the manifest's {len(value)} closed set(s)"
            )
    return value


def describe(pkg: Package, trusted: tuple[str, ...]) -> list[tuple[str, str]]:
    m = pkg.manifest
    a = m["adapters"][0] if m["adapters"] else {}
    trust_s = "trusted" if pkg.signed and pkg.pubkey in trusted else "not in packages.trusted_publishers"
    return [
        ("package", f"{m['name']} {m['version']}"),
        ("publisher", pkg.publisher + (f" ({trust_s})" if pkg.signed else "")),
        ("signature", "valid" if pkg.signed else "none"),
        ("files", f"{len(pkg.hashes) - 1}, every sha256 matches the manifest"),
        ("base model", f"{m['base_model'].get('id')} (fingerprint {m['base_model'].get('fingerprint')})"),
        (
            "adapter",
            f"{a.get('type')} r={a.get('r')} alpha={a.get('alpha')} on {', '.join(a.get('target_modules', []))}",
        ),
        ("scope", describe_summary(_scope(pkg, None))),
        *([("rule", Rule.recorded(r).on_replies("(every reply)"))] if (r := _rule(pkg)) else []),
        *[("closed set", said) for said in describe_recorded(_choices(pkg, None))],
        ("license", str(m.get("license"))),
    ]


__all__ = ["AdapterError", "Limits", "Package", "PackageError", "canonical", "install", "open_package", "pack"]
