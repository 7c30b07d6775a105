"""Publisher keys for ``.expert`` packages: an ed25519 key pair in ``$SHAMMAH_HOME/keys``.

The private key is PKCS#8 PEM, readable by its owner only; the public key is written as
``ed25519:<base64 of the 32 raw bytes>``, the form packages carry and ``packages.trusted_publishers``
lists.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from shammah.errors import ShammahError
from shammah.paths import atomic_write, ensure_dir

PREFIX = "ed25519:"


class KeyFileError(ShammahError):
    """A missing, unreadable or malformed key."""


def key_files(root: Path) -> tuple[Path, Path]:
    d = root / "keys"
    return d / "publisher.pem", d / "publisher.pub"


def public_text(raw: bytes) -> str:
    return PREFIX + base64.b64encode(raw).decode()


def parse_public(text: str):
    """``ed25519:<base64>`` → an Ed25519PublicKey (a clear error for anything else)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise KeyFileError(f"public key {text!r} is not of the form ed25519:<base64>")
    try:
        raw = base64.b64decode(text[len(PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise KeyFileError(f"public key {text!r} is not a valid ed25519 key") from None


def generate(root: Path, force: bool = False) -> str:
    """Write a new key pair; returns the public key text. Refuses to overwrite one unless ``force``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    priv_file, pub_file = key_files(root)
    if priv_file.exists() and not force:
        raise KeyFileError(
            f"a publisher key already exists ({priv_file}); packages signed with it would no longer verify "
            "against a new one. `shammah keys show` prints it; --force replaces it"
        )
    ensure_dir(priv_file.parent)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write(priv_file, pem)  # atomic_write creates files 0600
    os.chmod(priv_file, 0o600)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    atomic_write(pub_file, public_text(raw) + "\n")
    return public_text(raw)


def load_private(root: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    priv_file, _ = key_files(root)
    if not priv_file.is_file():
        raise KeyFileError("no publisher key yet: run `shammah keys generate` first")
    try:
        key = serialization.load_pem_private_key(priv_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise KeyFileError(
            f"{priv_file}: unreadable private key ({e}); `shammah keys generate --force` makes a new one"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{priv_file}: not an ed25519 key; `shammah keys generate --force` makes one")
    return key


def public_of(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return public_text(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
