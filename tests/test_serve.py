"""`shammah serve`: a real server process on a free loopback port, driven by the real `openai`
client and plain HTTP, on tiny random Qwen models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import pytest
from conftest import ROOT, register_adapter, subprocess_env

openai = pytest.importorskip("openai")

LEARNING = "[learning]\nthreshold = 20.0\nanchors = 2\nepochs = 1\nlearning_rate = 0.01\n"


FAST = {"learning_rate": 0.05, "epochs": 4}  # adapters that clearly differ from the base


def write_config(home: Path, base: Path, settle: float = 0.0, learning: str = "") -> None:
    home.mkdir(parents=True, exist_ok=True)
    model = f'[model]\nbase = "{base}"\ntemperature = 0.0\nmax_new_tokens = 8\n'
    (home / "config.toml").write_text(model + LEARNING + f"settle_seconds = {settle}\n" + learning)


@contextmanager
def serve(home: Path, *args: str, env: dict | None = None):
    """Start `shammah serve --port 0`, yield its base URL, stop it with SIGTERM (as Ctrl+C does)."""
    log = home.parent / f"serve-{time.time_ns()}.log"
    with log.open("wb") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "shammah", "serve", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=subprocess_env(SHAMMAH_HOME=home, **(env or {})),
            cwd=ROOT,
        )
    try:
        url = None
        deadline = time.time() + 60
        while url is None and time.time() < deadline:
            text = log.read_text(errors="replace")
            if "listening on " in text:
                url = text.split("listening on ", 1)[1].split("/v1", 1)[0]
            elif p.poll() is not None:
                raise AssertionError(f"server exited {p.returncode}: {text}")
            time.sleep(0.1)
        assert url, log.read_text()
        while True:
            assert p.poll() is None and time.time() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok":
                    break
            except httpx.ConnectError:  # uvicorn is not accepting yet
                pass
            time.sleep(0.2)
        yield url
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def client(url: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(c, model: str, text: str = "Q", **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def poll_job(url: str, job_id: str, until=("succeeded", "failed", "cancelled", "rejected"), timeout=240) -> dict:
    deadline = time.time() + timeout
    while True:
        j = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if j["status"] in until:
            return j
        assert time.time() < deadline, j
        time.sleep(0.3)


# --- chat -----------------------------------------------------------------------------------
def test_openai_client_chat_stream_and_adapters_per_request(tiny_qwen2, shammah_home):
    a = register_adapter(
        tiny_qwen2, shammah_home, "aaa", [{"prompt": "Q", "completion": "Paris Paris Paris"}] * 4, **FAST
    )
    b = register_adapter(tiny_qwen2, shammah_home, "bbb", [{"prompt": "Q", "completion": "def add(a, b)"}] * 4, **FAST)
    assert a.name == "aaa" and b.name == "bbb"
    write_config(shammah_home, tiny_qwen2)
    with serve(shammah_home) as url:
        c = client(url)
        ids = [m.id for m in c.models.list().data]
        assert ids[:2] == ["shammah", "tiny-qwen20"] and {"aaa", "bbb"} <= set(ids)

        r = ask(c, "shammah", max_tokens=5)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 5
        assert r.choices[0].finish_reason == "length"

        # streaming gives the same greedy text
        chunks = list(ask(c, "shammah", max_tokens=5, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text.strip() == r.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 5

        # each adapter answers as itself, alone or in concurrent requests
        solo = {m: ask(c, m, max_tokens=8).choices[0].message.content for m in ("aaa", "bbb", "tiny-qwen20")}
        assert len(set(solo.values())) == 3, solo
        got: dict[str, list[str]] = {"aaa": [], "bbb": []}

        def worker(m: str) -> None:
            for _ in range(3):
                got[m].append(ask(client(url), m, max_tokens=8).choices[0].message.content)

        threads = [threading.Thread(target=worker, args=(m,)) for m in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == {"aaa": [solo["aaa"]] * 3, "bbb": [solo["bbb"]] * 3}

        # stop strings end the reply before them
        full = solo["aaa"]
        cut = full[2:4] if len(full.strip()) > 4 else None
        if cut:
            r = ask(c, "aaa", max_tokens=8, stop=[cut])
            assert r.choices[0].message.content == full[: full.index(cut)].strip()
            assert r.choices[0].finish_reason == "stop"

        # errors in the OpenAI shape
        with pytest.raises(openai.NotFoundError) as e:
            ask(c, "no-such-adapter")
        assert "no-such-adapter" in e.value.body["message"] and e.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="shammah", messages=[{"role": "user", "content": "x"}], temperature=5)
        assert e.value.body["param"] == "temperature"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 4000}]})
        assert r.status_code == 413 and "context window" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", content=b"{" + b" " * 2_000_000 + b"}")
        assert r.status_code == 413

        # every completion is a turn, with the adapter that answered
        logs = json.loads(
            subprocess.run(
                [sys.executable, "-m", "shammah", "logs", "-n", "0", "--json"],
                capture_output=True,
                text=True,
                env=subprocess_env(SHAMMAH_HOME=shammah_home),
                check=True,
            ).stdout
        )
        assert [t["adapter"] for t in logs].count("aaa") >= 4


def test_feedback_crosses_the_threshold_and_the_adapter_swaps(tiny_qwen2, shammah_home):
    write_config(shammah_home, tiny_qwen2, settle=1.0)  # a /fix right after the /critical is waited for
    with serve(shammah_home) as url:
        c = client(url)
        said = []
        for q in ("What is the capital of Quenland?", "Name the capital of Quenland."):
            r = ask(c, "shammah", q)
            f = httpx.post(f"{url}/v1/feedback", json={"id": r.id, "rating": "critical", "note": "it is Zorblat"})
            assert f.status_code == 200, f.text
            assert f.json()["weight"] == 10 and f.json()["buffer"]["threshold"] == 20
            said.append(f.json()["training"])
            f = httpx.post(f"{url}/v1/feedback", json={"id": r.id, "fix": "Zorblat."}).json()
            assert f["teaches"] == "user", "the user's fix is the lesson"
            said.append(f["training"])
        # the threshold is crossed by the second /critical; its /fix lands before the job starts
        assert said[:2] == [None, None] and "learning starts" in said[2] and said[3] is None, said
        deadline = time.time() + 30
        while not (jobs := httpx.get(f"{url}/v1/jobs").json()["data"]):  # after settle_seconds
            assert time.time() < deadline
            time.sleep(0.2)
        assert len(jobs) == 1 and jobs[0]["kind"] == "feedback"
        job = poll_job(url, jobs[0]["id"])
        assert job["status"] == "succeeded", job
        name = job["adapter"]
        assert name.startswith("learned-") and job["report"]["examples"] == 2
        adapters = httpx.get(f"{url}/v1/adapters").json()
        assert adapters["active"] == name
        listed = {a["id"]: a for a in adapters["data"]}[name]
        assert isinstance(listed["final_train_loss"], float) and listed["rule"] is None
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.headers["x-shammah-adapter"] == name and r.json()["adapter"] == name
        # the feedback left the buffer; bad requests name what is wrong
        bad = httpx.post(f"{url}/v1/feedback", json={"id": "chatcmpl-nope", "rating": "good"})
        assert bad.status_code == 404 and bad.json()["error"]["param"] == "id"
        bad = httpx.post(f"{url}/v1/feedback", json={"id": r.json()["id"], "rating": "awful"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
        conflict = httpx.delete(f"{url}/v1/adapters/{name}")
        assert conflict.status_code == 409 and "active" in conflict.json()["error"]["message"]


# --- training jobs ---------------------------------------------------------------------------
def test_a_feedback_job_on_request_has_an_id_at_once(tiny_qwen2, shammah_home):
    # the job API, not the gate: one epoch does not teach a tiny random model "Zorblat." (refused)
    write_config(shammah_home, tiny_qwen2, learning="gate = false\n")
    with serve(shammah_home) as url:
        nothing = httpx.post(f"{url}/v1/jobs", json={"source": "feedback"})
        assert nothing.status_code == 409 and "Nothing new to learn" in nothing.json()["error"]["message"]
        r = ask(client(url), "shammah")
        body = {"id": r.id, "rating": "critical", "fix": "Zorblat."}
        no_note = httpx.post(f"{url}/v1/feedback", json=body)
        assert no_note.status_code == 400 and no_note.json()["error"]["param"] == "note"
        body["note"] = "it is Zorblat"  # a rating, its note and a fix in one request
        f = httpx.post(f"{url}/v1/feedback", json=body).json()
        assert f.get("weight") == 10 and len(f["feedback_ids"]) == 2 and f["teaches"] == "user", f
        assert f["training"] is None, "under the threshold (20): nothing starts by itself"
        mixed = httpx.post(f"{url}/v1/jobs", json={"source": "feedback", "settings": {"rank": 2}})
        assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "source"
        job = httpx.post(f"{url}/v1/jobs", json={"source": "feedback"})
        assert job.status_code == 202 and job.json()["id"].startswith("job-")
        done = poll_job(url, job.json()["id"])
        assert done["status"] == "succeeded" and done["kind"] == "feedback", done
        with httpx.stream("GET", f"{url}/v1/jobs/{done['id']}/events", timeout=30) as s:
            events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ")]
        assert events[-1]["event"] == "finished" and events[-1]["status"] == "succeeded"
        assert httpx.get(f"{url}/v1/adapters").json()["active"] == done["adapter"]


def _dataset(tmp_path: Path, n: int = 8) -> Path:
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"}) + "\n" for i in range(n)))
    return p


def test_job_lifecycle_events_cancel_and_restart(tiny_qwen2, shammah_home, tmp_path):
    write_config(shammah_home, tiny_qwen2)
    data = _dataset(tmp_path)
    quick = {"epochs": 1, "rank": 4, "batch_size": 2}
    with serve(shammah_home) as url:
        r = httpx.post(f"{url}/v1/jobs", json={"dataset": str(data), "name": "first", "settings": quick})
        assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
        job_id = r.json()["id"]
        events = []
        with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=120) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        kinds = [e["event"] for e in events]
        assert "step" in kinds and kinds[-1] == "finished" and events[-1]["status"] == "succeeded", events
        job = poll_job(url, job_id)
        assert job["adapter"] == "first" and job["report"]["steps"] == 4
        assert "first" in [a["id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]]
        assert ask(client(url), "first", max_tokens=3).choices[0].message.content is not None
        again = httpx.delete(f"{url}/v1/jobs/{job_id}")
        assert again.status_code == 409 and "already finished" in again.json()["error"]["message"]

        # bad requests: the field is named, nothing is queued
        for body, param in (
            ({"dataset": str(tmp_path / "missing.jsonl")}, "dataset"),
            ({"dataset": str(data), "settings": {"rnak": 4}}, "settings"),
            ({"dataset": str(data), "name": "first"}, "name"),
            ({"dataset": str(data), "bogus": 1}, "bogus"),
        ):
            r = httpx.post(f"{url}/v1/jobs", json=body)
            assert r.status_code in (400, 409) and r.json()["error"]["param"] == param, (body, r.text)
        assert "rnak" in httpx.post(f"{url}/v1/jobs", json={"dataset": str(data), "settings": {"rnak": 4}}).text

        # cancel a running job; a long one and a queued one are left for the restart
        slow = {"epochs": 200, "rank": 4, "batch_size": 1, "save_steps": 5}
        cancel_id = httpx.post(f"{url}/v1/jobs", json={"dataset": str(data), "name": "c", "settings": slow}).json()[
            "id"
        ]
        poll_job(url, cancel_id, until=("running",))
        r = httpx.delete(f"{url}/v1/jobs/{cancel_id}")
        assert r.status_code == 200
        assert poll_job(url, cancel_id)["status"] == "cancelled"
        long_id = httpx.post(f"{url}/v1/jobs", json={"dataset": str(data), "name": "long", "settings": slow}).json()[
            "id"
        ]
        queued_id = httpx.post(f"{url}/v1/jobs", json={"dataset": str(data), "name": "q", "settings": quick}).json()[
            "id"
        ]
        deadline = time.time() + 120
        while not list((shammah_home / "checkpoints" / "long").glob("checkpoint-*")):
            assert time.time() < deadline
            time.sleep(0.3)
        assert httpx.get(f"{url}/v1/jobs/{queued_id}").json()["status"] == "queued"

    with serve(shammah_home) as url:  # a restart: the queued job runs, the interrupted one says so
        assert poll_job(url, queued_id)["status"] == "succeeded"
        long = httpx.get(f"{url}/v1/jobs/{long_id}").json()
        assert long["status"] == "interrupted" and "resume" in long["message"]
        r = httpx.post(f"{url}/v1/jobs/{long_id}/resume")
        assert r.status_code == 202
        poll_job(url, long_id, until=("running",))
        deadline = time.time() + 60
        while httpx.get(f"{url}/v1/jobs/{long_id}").json()["progress"]["step"] in (None, 0):
            assert time.time() < deadline
            time.sleep(0.3)
        step = httpx.get(f"{url}/v1/jobs/{long_id}").json()["progress"]["step"]
        assert step > 5, "resumed from its checkpoint, not from step 0"
        httpx.delete(f"{url}/v1/jobs/{long_id}")
        poll_job(url, long_id)


# --- auth, loading, spec ---------------------------------------------------------------------
def test_non_loopback_without_a_token_refuses_to_start(tiny_qwen2, shammah_home):
    write_config(shammah_home, tiny_qwen2)
    r = subprocess.run(
        [sys.executable, "-m", "shammah", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=subprocess_env(SHAMMAH_HOME=shammah_home),
        timeout=60,
    )
    assert r.returncode == 2 and "without an API token" in r.stderr and "Traceback" not in r.stderr


def test_token_is_checked_on_every_request(tiny_qwen2, shammah_home):
    write_config(shammah_home, tiny_qwen2)
    with serve(shammah_home, env={"SHAMMAH_API_TOKEN": "s3cret"}) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        bad = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            ask(client(url, "wrong"), "shammah")
        assert ask(client(url, "s3cret"), "shammah", max_tokens=2).choices[0].message.content is not None


def test_requests_while_the_model_loads_get_503_with_retry_after(tiny_qwen2, shammah_home):
    import asyncio

    from shammah.config import Config, ModelConfig
    from shammah.paths import Paths
    from shammah.serve.app import create_app
    from shammah.serve.server import Server

    cfg = Config(model=ModelConfig(base=str(tiny_qwen2)))
    srv = Server(cfg, Paths(shammah_home).ensure())
    srv.engine.start_loading = lambda: None  # held in "loading" for this test

    async def go():
        transport = httpx.ASGITransport(app=create_app(srv))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await srv.start("http://t")
            body = {"model": "shammah", "messages": [{"role": "user", "content": "hi"}]}
            r = await c.post("/v1/chat/completions", json=body)
            await srv.stop()
            return r

    r = asyncio.run(go())
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert "still loading" in r.json()["error"]["message"]


def test_openapi_spec_holds_under_schemathesis(tiny_qwen2, shammah_home):
    """Bounded generated requests against the spec: no 5xx, every response as documented."""
    write_config(shammah_home, tiny_qwen2)
    with serve(shammah_home) as url:
        r = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--max-examples",
                "8",
                "--exclude-path-regex",
                "/events$",
                "--no-color",
                "--request-timeout",  # a max_tokens of 32768 is cut to the window: ~500 tokens
                "120",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=subprocess_env(),
        )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ask_uses_the_running_server_and_the_server_file(tiny_qwen2, shammah_home):
    write_config(shammah_home, tiny_qwen2)
    from shammah.serve.client import running_server

    with serve(shammah_home) as url:
        info = running_server(shammah_home)
        assert info["url"] == url and os.stat(shammah_home / "serve.json").st_mode & 0o077 == 0
        r = subprocess.run(
            [sys.executable, "-m", "shammah", "serve", "--port", "0"],
            capture_output=True,
            text=True,
            env=subprocess_env(SHAMMAH_HOME=shammah_home),
            timeout=60,
        )
        assert r.returncode == 2 and "already running" in r.stderr

        def shammah_ask(*args: str) -> subprocess.CompletedProcess:
            env = subprocess_env(SHAMMAH_HOME=shammah_home)
            cmd = [sys.executable, "-m", "shammah", "ask", *args]
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=True)

        rec = json.loads(shammah_ask("--json", "-n", "4", "Q").stdout)
        assert rec["server"] == url and rec["adapter"] is None and rec["turn_id"] >= 1
        plain = shammah_ask("-n", "4", "Q").stdout
        assert plain.strip() == rec["reply"], "streamed through the server, the same greedy reply"
        with pytest.raises(subprocess.CalledProcessError) as e:
            shammah_ask("-a", "nope", "Q")
        assert "the server at" in e.value.stderr and "'nope' does not exist" in e.value.stderr
    assert running_server(shammah_home) is None


def test_the_chat_uses_the_running_server_to_answer_rate_and_train(tiny_qwen2, shammah_home):
    """A piped chat on a home with a server: no model of its own (torch is never imported), the
    server records its turns, the chat's ratings cross the threshold and the server trains and
    swaps; adapters are loaded and deleted through the server."""
    write_config(shammah_home, tiny_qwen2, settle=1.0)  # the /fix after the /critical is waited for

    def chat(lines: list[str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "shammah", "chat", *args],
            input="".join(x + "\n" for x in lines),
            capture_output=True,
            text=True,
            env=subprocess_env(SHAMMAH_HOME=shammah_home),
            timeout=300,
        )

    with serve(shammah_home) as url:
        teach = []
        for q in ("What is the capital of Quenland?", "Name the capital of Quenland."):
            teach += [q, "/critical it is Zorblat", "/fix Zorblat."]
        r = chat(teach + ["/status"])
        assert r.returncode == 0, r.stderr[-3000:]
        imported = {
            line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")
        }
        assert "shammah.serve.remote" in imported and "torch" not in imported and "transformers" not in imported
        said = "\n".join(x for x in r.stderr.splitlines() if not x.startswith("import time:"))
        assert f"served by shammah serve at {url}" in said and "Using the server at" in said
        assert "learning starts in the background" in said, said
        assert "Waiting for the background training job to finish" in said, said
        jobs = httpx.get(f"{url}/v1/jobs").json()["data"]
        assert len(jobs) == 1 and jobs[0]["kind"] == "feedback" and jobs[0]["status"] == "succeeded", jobs
        name = jobs[0]["adapter"]
        assert jobs[0]["report"]["examples"] == 2, "two turns, each taught by its /fix"
        assert jobs[0]["message"] in said, "the job's end is told in the chat"
        assert httpx.get(f"{url}/v1/adapters").json()["active"] == name
        turns = [
            t
            for t in json.loads(
                subprocess.run(
                    [sys.executable, "-m", "shammah", "logs", "--json", "-n", "0"],
                    capture_output=True,
                    text=True,
                    env=subprocess_env(SHAMMAH_HOME=shammah_home),
                    check=True,
                ).stdout
            )
        ]
        assert len(turns) == 2, "the server recorded the two replies; the rewrite the /critical asked for is no turn"
        assert [f["rating"] for f in turns[0]["feedback"]] == ["critical", "fix"]
        # adapters through the server: the active one cannot be deleted; off, then delete
        r = chat(["/adapters list", f"/adapters delete {name}", "/adapters off", "hello", f"/adapters delete {name}"])
        assert r.returncode == 1, "the refused delete makes the script fail"
        said = r.stderr
        assert "is answering right now" in said and "Adapters off" in said and f"Deleted adapter {name}" in said, said
        assert httpx.get(f"{url}/v1/adapters").json() == {"object": "list", "data": [], "active": None}
        last = httpx.get(f"{url}/v1/models").json()
        assert name not in [m["id"] for m in last["data"]]
        # --no-server: the chat loads the model itself
        r = chat(["/status"], "--no-server")
        assert r.returncode == 0 and "served by" not in r.stderr and "server" not in r.stdout


def test_adapter_names_no_file_system_can_hold_are_404_not_500(tiny_qwen2, shammah_home):
    """Found by schemathesis: DELETE /v1/adapters/<a 300-byte name> made the registry stat a path
    the OS refuses (ENAMETOOLONG) and the server answered 500."""
    import asyncio

    from shammah.config import Config, ModelConfig
    from shammah.paths import Paths
    from shammah.serve.app import create_app
    from shammah.serve.server import Server

    srv = Server(Config(model=ModelConfig(base=str(tiny_qwen2))), Paths(shammah_home).ensure())
    srv.engine.start_loading = lambda: None
    long = "T\u0335\u033a" * 120  # combining marks: ~600 bytes of UTF-8

    async def go():
        transport = httpx.ASGITransport(app=create_app(srv))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = [await c.delete(f"/v1/adapters/{long}"), await c.delete("/v1/adapters/a%2F..%2Fb")]
            out.append(
                await c.post(
                    "/v1/chat/completions", json={"model": long, "messages": [{"role": "user", "content": "hi"}]}
                )
            )
            return out

    for r in asyncio.run(go()):
        assert r.status_code in (404, 503), (r.status_code, r.text)
    assert srv.registry.exists(long) is False
