"""The one place that knows where things live.

Everything is under one home: ``$SHAMMAH_HOME`` if set, else the platformdirs
user data dir. Directories are created 0700 and files written 0600; writes
that must survive a crash go through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shammah.errors import ShammahError

DIR_MODE = 0o700
FILE_MODE = 0o600


def home() -> Path:
    env = os.environ.get("SHAMMAH_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("shammah", appauthor=False))


def default_config_file() -> Path:
    """``$SHAMMAH_HOME/config.toml`` when SHAMMAH_HOME is set, else the user config dir."""
    if os.environ.get("SHAMMAH_HOME"):
        return home() / "config.toml"
    import platformdirs

    return Path(platformdirs.user_config_dir("shammah", appauthor=False)) / "config.toml"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` private (0700) if it is missing. A directory that exists is left as it is:
    its mode is its owner's choice (see :meth:`Paths.too_open` for the warning)."""
    if path.is_dir():
        return path
    if path.exists() or path.is_symlink():
        raise ShammahError(f"{path} is a file, not a directory; move it away, or set SHAMMAH_HOME to another place")
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    except OSError:  # not ours to change (e.g. a shared mount): leave it
        pass
    return path


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(home())

    @property
    def db(self) -> Path:
        return self.root / "shammah.db"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def history(self) -> Path:
        return self.root / "history"

    def ensure(self) -> Paths:
        for d in (self.root, self.cache, self.adapters, self.logs):
            ensure_dir(d)
        return self

    def too_open(self) -> str | None:
        """A warning when the home (chats, feedback, adapters) can be read or written by others."""
        mode = stat.S_IMODE(self.root.stat().st_mode)
        if mode & 0o077:
            return (
                f"{self.root} is readable or writable by other users (mode {mode:o}): your chats and feedback are "
                f"in it; `chmod 700 {self.root}` to keep them private"
            )
        return None


def touch_private(path: Path) -> Path:
    """Create ``path`` (if missing) readable by its owner only."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, FILE_MODE)
    os.close(fd)
    os.chmod(path, FILE_MODE)
    return path


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via temp file + fsync + rename, so readers see old or new, never half."""
    if isinstance(data, str):
        data = data.encode()
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
