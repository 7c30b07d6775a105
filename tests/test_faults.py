"""Bad input and broken surroundings, as a new user and an attacker meet them (issue 8): one line
naming the path, key or line and what to do, a non-zero exit, never a traceback, nothing lost.
Each of these failed before its fix: a traceback, a silently dropped line, or exit status 0."""

import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import subprocess_env
from test_cli import run

from shammah.feedback.compile import compile_feedback
from shammah.feedback.store import Store


def _one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    for n in needles:
        assert n in line, line


def test_a_home_that_is_a_file(shammah_home):
    shammah_home.parent.mkdir(parents=True, exist_ok=True)
    shammah_home.write_text("oops")
    r = run(["adapters", "list"])
    _one_line_error(r, str(shammah_home), "is a file, not a directory", "SHAMMAH_HOME")


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_a_database_that_is_not_one(shammah_home, damage):
    db = shammah_home / "shammah.db"
    shammah_home.mkdir(parents=True)
    if damage == "garbage":
        db.write_bytes(os.urandom(4096))
    else:
        db.mkdir()
    r = run(["ask", "hi"])
    _one_line_error(r, str(db), "move it away")
    if damage == "garbage":
        assert len(db.read_bytes()) == 4096, "the user's file is left alone"


def _chattr(path, flag: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


def test_an_immutable_database(shammah_home):
    """chattr +i: not even root may write it; one line naming the file, and the file is intact."""
    assert run(["logs"]).returncode == 0  # creates the database
    db = shammah_home / "shammah.db"
    before = db.read_bytes()
    if not _chattr(db, "+i"):
        pytest.skip("chattr +i is not permitted here")
    try:
        _one_line_error(run(["ask", "hi"]), str(db), "writable")
        assert db.read_bytes() == before
    finally:
        _chattr(db, "-i")


def test_a_log_file_that_cannot_be_written(shammah_home):
    (shammah_home / "logs" / "shammah.log").mkdir(parents=True)
    r = run(["adapters", "list"])
    _one_line_error(r, "shammah.log", "writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_home(shammah_home):
    shammah_home.mkdir(parents=True)
    shammah_home.chmod(0o500)
    try:
        _one_line_error(run(["adapters", "list"]), str(shammah_home))
    finally:
        shammah_home.chmod(0o700)


def test_a_dataset_that_is_not_utf8_names_the_line(shammah_home, tmp_path, tiny_qwen2):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "Q", "completion": "A"}\n{"prompt": "Caf\xe9", "completion": "A"}\n')
    r = run(["train", "--base", str(tiny_qwen2), "--dataset", str(data), "--yes"])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{data}:2: not UTF-8 text (byte 0xe9 at column 16)" in r.stderr, r.stderr


def test_nan_in_the_config_is_refused(shammah_home):
    shammah_home.mkdir(parents=True)
    (shammah_home / "config.toml").write_text("[model]\ntemperature = nan\n")
    r = run(["config"])
    assert r.returncode == 2 and "model.temperature = nan is not a number" in r.stderr


def test_piped_chat_keeps_every_line_and_fails_at_the_end(tiny_qwen2, shammah_home):
    """A line with a stray byte is read (the byte replaced), the lines after it still run, and a
    failed command makes the exit status non-zero — after everything else was done."""
    stdin = b"caf\xe9 au lait?\n/nonsense\nsecond question\n/good\n"
    r = run(["--model", str(tiny_qwen2)], stdin, SHAMMAH_THREADS=1)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "unknown command /nonsense" in r.stderr and "1 line(s) failed" in r.stderr
    store = Store(shammah_home / "shammah.db")
    turns = [store.turn(i) for i in (1, 2)]
    assert [t.prompt for t in turns] == ["caf\ufffd au lait?", "second question"]
    [fb] = store.list_feedback()
    assert fb.turn_id == 2 and fb.rating == "good"
    store.close()


def test_piped_stdout_carries_the_replies_alone(tiny_qwen2, shammah_home):
    r = run(["--model", str(tiny_qwen2)], "hello\n/good\n/feedback list\nagain\n", SHAMMAH_THREADS=1)
    assert r.returncode == 0, r.stderr
    store = Store(shammah_home / "shammah.db")
    from shammah.repl.io import printable

    replies = [printable(store.turn(i).reply) for i in (1, 2)]
    store.close()
    assert r.stdout.split() == " ".join(replies).split(), "nothing but the two replies"
    assert "Saved /good #1" in r.stderr and "rating" in r.stderr


def test_typed_escape_sequences_do_not_come_back_raw(tiny_qwen2, shammah_home):
    evil = "\x1b]0;pwned\x07\x1b[2J"
    r = run(["--model", str(tiny_qwen2)], f"hi\n/critical bad {evil} note\n/feedback list\n/feedback show\n")
    assert "\x1b" not in r.stderr.replace("\x1b[0m", "") and "\x07" not in r.stderr
    assert "bad ]0;pwned[2J note" in r.stderr


def test_an_open_home_is_left_as_it_is_with_a_warning(shammah_home):
    shammah_home.mkdir(parents=True)
    shammah_home.chmod(0o1777)
    r = run(["config", "path"])
    assert r.returncode == 0
    assert stat.S_IMODE(shammah_home.stat().st_mode) == 0o1777, "not ours to change"
    assert f"warning: {shammah_home} is readable or writable by other users (mode 1777)" in r.stderr


def _workers(home) -> list[int]:
    """PIDs of training workers of this home (their job file lies under it)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"shammah.training.worker" in cmd and any(str(home).encode() in c for c in cmd):
                pids.append(int(d))
    return pids


def _slow_learning_config(home, **extra):
    home.mkdir(parents=True, exist_ok=True)
    body = {"threshold": 1, "settle_seconds": 0, "anchors": 2, "epochs": 100, "gate": "false", **extra}
    (home / "config.toml").write_text("[learning]\n" + "".join(f"{k} = {v}\n" for k, v in body.items()))


def _wait_for(cond, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def _chat_training(model, home) -> subprocess.Popen:
    """A piped chat whose one /fix starts a long job; stdin stays open, like a script still talking."""
    _slow_learning_config(home)
    p = subprocess.Popen(
        [sys.executable, "-m", "shammah", "--model", str(model)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(SHAMMAH_THREADS=1),
    )
    p.stdin.write(b"Q?\n/fix A.\n")
    p.stdin.flush()
    # a worker process can be up (the spare, waiting) before the job is recorded as running
    assert _wait_for(lambda: _workers(home) and _running(home)), "the job started"
    return p


def _running(home) -> bool:
    """A job of this home's chat is recorded as running (read-only: the chat owns the database)."""
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{home / 'shammah.db'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0] > 0
        finally:
            db.close()
    except sqlite3.Error:
        return False


def test_sigterm_ends_the_chat_like_exit_and_leaves_no_orphan(tiny_qwen2, shammah_home):
    p = _chat_training(tiny_qwen2, shammah_home)
    [worker] = _workers(shammah_home)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0
    assert _wait_for(lambda: not os.path.exists(f"/proc/{worker}") or _zombie(worker), 30), "no orphan worker"
    store = Store(shammah_home / "shammah.db")
    [status] = [r["status"] for r in store.db.execute("SELECT status FROM jobs")]
    assert status == "cancelled"
    assert not compile_feedback(store, 0)[0][0].trained, "its feedback stays in the buffer"
    store.close()


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_a_chat_killed_mid_job_is_marked_interrupted_and_retrains_at_start(tiny_qwen2, shammah_home):
    """SIGKILL (no handler can run): the next chat marks the job interrupted, removes its
    checkpoints, and — the buffer being over the threshold — trains again without new feedback."""
    p = _chat_training(tiny_qwen2, shammah_home)
    p.kill()
    p.wait(10)
    for w in _workers(shammah_home):  # (its death with the chat is tested on its own below)
        os.kill(w, signal.SIGKILL)
    _slow_learning_config(shammah_home, epochs=1)
    r = run(["--model", str(tiny_qwen2)], "/train status\n", SHAMMAH_THREADS=1)
    assert r.returncode == 0, r.stderr
    assert re.search(r"Training job job-\S+ was interrupted when the chat stopped", r.stderr), r.stderr
    assert "Learned: now answering with learned-" in r.stderr, "trained at start, no new feedback needed"
    store = Store(shammah_home / "shammah.db")
    statuses = [r["status"] for r in store.db.execute("SELECT status FROM jobs ORDER BY created_at")]
    assert statuses == ["interrupted", "done"]
    store.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_with_its_chat_even_when_it_writes_nothing():
    """A worker busy without writing (loading a big model, generating anchors, the gate) would
    train on for minutes after its chat was SIGKILLed; the kernel now ends it with the chat."""
    chat = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "env = dict(os.environ, SHAMMAH_PARENT_PID=str(os.getpid()))\n"
            "code = 'from shammah.training.worker import die_with_parent as d; d(); import time; time.sleep(120)'\n"
            "w = subprocess.Popen([sys.executable, '-c', code], env=env)\n"
            "print(w.pid, flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    worker = int(chat.stdout.readline())
    time.sleep(2)  # the worker has set itself up
    assert not _zombie(worker), "the worker runs while its chat does"
    chat.kill()
    chat.wait(10)
    assert _wait_for(lambda: _zombie(worker), 15), "the worker outlived its chat"
