"""The `shammah` command as a user runs it: real subprocesses, pipes and a pseudo-terminal."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

from conftest import register_adapter, subprocess_env

from shammah.adapters.active import ActiveAdapter
from shammah.feedback.store import Store
from shammah.repl.io import printable

SHAMMAH = [sys.executable, "-m", "shammah"]


def run(args, stdin="", timeout=120, **env):
    # bytes, decoded by hand: text mode would turn a stray "\r" in a random model's reply into "\n"
    r = subprocess.run(
        SHAMMAH + args,
        input=stdin if isinstance(stdin, bytes) else stdin.encode(),
        capture_output=True,
        timeout=timeout,
        env=subprocess_env(**env),
    )
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


def test_help_is_instant_and_imports_nothing_heavy():
    code = (
        "import sys; from shammah import cli; from shammah.repl import app, commands; "
        "from shammah.engine import Engine; cli.build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'huggingface_hub') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert r.stdout.strip() == "[]"
    r = run(["--help"])
    assert r.returncode == 0 and "/critical <note>" in r.stdout and "SHAMMAH_HOME" in r.stdout


def test_piped_chat_is_scriptable(tiny_qwen2, shammah_home):
    r = run(["--model", str(tiny_qwen2)], "hello\n/good\n/status\n", SHAMMAH_THREADS=1)
    assert r.returncode == 0, r.stderr
    assert "Saved /good #1 for the last reply (weight 1). Training buffer: 1 example (1 weighted)" in r.stderr
    assert "Saved" not in r.stdout, "acknowledgements go to stderr, replies alone to stdout"
    assert f"Model: {tiny_qwen2.name}" in r.stderr, "start-up notices go to stderr, replies to stdout"
    assert "\x1b[" not in r.stdout, "no colour codes when stdout is not a terminal"
    store = Store(shammah_home / "shammah.db")
    [fb] = store.list_feedback()
    assert fb.prompt == "hello" and fb.rating == "good"
    store.close()


def test_ask_prints_one_reply_and_records_the_turn(tiny_qwen2, shammah_home):
    r = run(["--model", str(tiny_qwen2), "ask", "hello", "there"], SHAMMAH_THREADS=1)
    assert r.returncode == 0, r.stderr
    store = Store(shammah_home / "shammah.db")
    turn = store.turn(1)
    assert turn.prompt == "hello there"
    assert turn.reply and printable(turn.reply) in r.stdout
    store.close()


def test_bad_model_is_one_line_and_no_traceback():
    r = run(["--model", "./nowhere", "ask", "hi"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert 'Use "embedded" for the built-in model' in r.stderr


def test_acknowledged_feedback_survives_sigkill(tiny_qwen2, shammah_home):
    p = subprocess.Popen(
        SHAMMAH + ["--model", str(tiny_qwen2)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # acknowledgements go to stderr in a script; stdout carries replies
        text=True,
        env=subprocess_env(SHAMMAH_THREADS=1),
    )
    p.stdin.write("what is the capital of Quenland?\n/critical wrong, it is Zorblat\n")
    p.stdin.flush()
    deadline = time.time() + 120
    seen = ""
    while "Saved /critical" not in seen and time.time() < deadline:
        seen += p.stderr.readline()
    assert "Saved /critical" in seen
    p.send_signal(signal.SIGKILL)  # the instant after the acknowledgement, with stdin still open
    p.wait(10)
    store = Store(shammah_home / "shammah.db")
    [fb] = store.list_feedback()
    assert (fb.rating, fb.note, fb.weight) == ("critical", "wrong, it is Zorblat", 10.0)
    assert fb.prompt == "what is the capital of Quenland?"
    store.close()


def _read_until(fd, needle: bytes, timeout=120) -> bytes:
    buf = b""
    deadline = time.time() + timeout
    while needle not in buf and time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    assert needle in buf, buf.decode(errors="replace")[-2000:]
    return buf


def test_interactive_terminal_session(tiny_qwen2, shammah_home):
    pid, fd = pty.fork()
    if pid == 0:  # child: the real CLI on a pseudo-terminal
        env = subprocess_env(SHAMMAH_THREADS=1, PROMPT_TOOLKIT_NO_CPR=1)
        os.execvpe(sys.executable, SHAMMAH + ["--model", str(tiny_qwen2)], env)
    try:
        _read_until(fd, "›".encode())
        os.write(fd, b"hello\r")
        _read_until(fd, b"\n")
        _read_until(fd, "›".encode())
        os.write(fd, b"/good\r")
        _read_until(fd, b"Training buffer: 1 example")
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)
    assert "/good" in (shammah_home / "history").read_text()
    assert oct(os.stat(shammah_home / "history").st_mode & 0o777) == "0o600"


def test_ask_reads_stdin_takes_options_after_the_subcommand_and_prints_json(tiny_qwen2, shammah_home):
    import json

    register_adapter(
        tiny_qwen2,
        shammah_home,
        "mine",
        [{"prompt": "What is up?", "completion": "Zorblat zorblat zorblat."}] * 4,
        epochs=8,
        learning_rate=5e-2,
    )
    args = ["ask", "--model", str(tiny_qwen2), "-s", "Be brief.", "-t", "1", "--seed", "7", "-n", "8", "--json"]
    r = run(args + ["--adapter", "mine"], "What is up?\n", SHAMMAH_THREADS=1)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    store = Store(shammah_home / "shammah.db")
    turn = store.turn(rec["turn_id"])
    assert (rec["reply"], rec["adapter"]) == (turn.reply, "mine") and turn.prompt == "What is up?"
    assert turn.messages[0] == {"role": "system", "content": "Be brief."}
    assert ActiveAdapter(store).name is None, "--adapter is for this question only"
    store.close()
    base = json.loads(run(args, "What is up?\n", SHAMMAH_THREADS=1).stdout)
    assert base["adapter"] is None and base["reply"] != rec["reply"], "same seed: only the adapter differs"
    empty = run(["ask", "--model", str(tiny_qwen2)], "  \n")
    assert empty.returncode == 2 and "no question" in empty.stderr


def test_logs_shows_turns_with_their_ratings(shammah_home):
    """`shammah logs` browses what is already in SQLite: newest N, oldest first, filter by adapter,
    JSON for scripts; text typed by the user is shown without its control sequences."""
    store = Store(shammah_home / "shammah.db")
    conv = store.new_conversation("m", None)
    kw = {"model": "m", "finish_reason": "stop", "new_tokens": 5, "seconds": 0.5}
    ids = []
    for i, adapter in enumerate([None, "learned-1", None, "learned-1"]):
        ids.append(store.add_turn(conv, [], f"question {i}\x1b[31m?", f"reply {i}", adapter=adapter, **kw))
    store.rate(ids[1], "critical", "it is Zorblat")
    store.fix(ids[1], "Zorblat is the capital.")
    store.rate(ids[3], "good")
    store.close()

    r = run(["logs", "-n", "2"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "question 2" in out and "question 3" in out and "question 1" not in out
    assert out.index("question 2") < out.index("question 3"), "oldest first"
    assert "\x1b" not in out and "[good, weight 1]" in out

    turns = json.loads(run(["logs", "--json", "--adapter", "learned-1"]).stdout)
    assert [t["id"] for t in turns] == [ids[1], ids[3]]
    fb = turns[0]["feedback"]
    assert [(f["rating"], f["note"], f["fix"]) for f in fb] == [
        ("critical", "it is Zorblat", None),
        ("fix", None, "Zorblat is the capital."),
    ]
    base = json.loads(run(["logs", "--json", "-n", "0", "--adapter", "none"]).stdout)
    assert [t["id"] for t in base] == [ids[0], ids[2]] and all(t["adapter"] is None for t in base)
