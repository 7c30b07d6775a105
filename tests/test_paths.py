import os
import stat

from shammah.paths import Paths, atomic_write, home


def test_home_from_env_and_private_dirs(shammah_home):
    assert home() == shammah_home
    p = Paths.from_env().ensure()
    for d in (p.root, p.cache, p.adapters, p.logs):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_atomic_write_is_private_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write(target, "one")
    atomic_write(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
