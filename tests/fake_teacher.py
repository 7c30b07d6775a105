"""A scripted OpenAI-compatible teacher on a loopback port, for the named-training pipeline: it
writes batches for the `notes` schema (examples/notes) with the faults a real teacher makes —
an answer that is not JSON, examples that break the schema, near-duplicates — and answers the
preference stage's "ideal answer" requests from what it generated; it also rewrites a rated
answer as the chat's note asks (learning.rewriter = "teacher")."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = (
    "garden budget travel recipe piano invoice birthday meeting laundry dentist project paint "
    "novel podcast bicycle passport insurance taxes groceries concert holiday kitchen garage"
).split()


class FakeTeacher:
    def __init__(self, seed: int = 0, delay_after: int | None = None, delay_s: float = 60.0):
        self.rng = random.Random(seed)
        self.answers: dict[str, dict] = {}  # request text -> the right answer
        self.rewrites: list[list[dict]] = []  # the conversations it was asked to rewrite an answer of
        self.requests = 0
        self.batch_requests = 0
        self.delay_after, self.delay_s = delay_after, delay_s
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeTeacher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # what it says ------------------------------------------------------------------------------
    def _title(self) -> str:
        return f"{self.rng.choice(WORDS)} {self.rng.choice(WORDS)} {self.rng.randint(1, 999)}"

    def _example(self, kind: str) -> dict:
        r = self.rng.random()
        if kind == "negative":
            if r < 0.5:
                return {
                    "input": f"add a note please ({self.rng.randint(1, 10**6)})",
                    "output": {"clarify": "What should the note be called?"},
                }
            return {
                "input": f"what is the weather in {self._title()}?",
                "output": {"error": "not a request for the notes tool"},
            }
        if kind == "context":
            t = self._title()
            return {
                "context": f"my list about {t}",
                "input": f"pin a note for that list {self.rng.randint(1, 10**6)}",
                "output": {"command": "notes", "subcommand": "add", "args": {"title": t, "pinned": True}},
            }
        if r < 0.4:
            t = self._title()
            return {
                "input": f"add a note called {t}",
                "output": {"command": "notes", "subcommand": "add", "args": {"title": t}},
            }
        if r < 0.7:
            t = self._title()
            return {
                "input": f"remind me to {t} on friday",
                "output": {"command": "todo", "subcommand": "add", "args": {"task": t, "due": "friday"}},
            }
        m = self.rng.randint(1, 180)
        return {
            "input": f"start a {m} minute timer for {self._title()}",
            "output": {"command": "timer", "subcommand": "start", "args": {"minutes": m}},
        }

    FAULTS = (
        lambda ex: {**ex, "output": {"command": "email", "subcommand": "send", "args": {}}},  # unknown command
        lambda ex: {**ex, "output": {"command": "timer", "subcommand": "start", "args": {"minutes": "ten"}}},
        lambda ex: {**ex, "output": {"command": "timer", "subcommand": "start", "args": {}}},  # required missing
    )

    def batch(self, user: str) -> str:
        self.batch_requests += 1
        if self.batch_requests == 1:
            return 'Sure! Here are the examples: [{"input": "add a note", '  # cut off: not JSON
        k = int(re.search(r"Write (\d+) diverse examples", user).group(1))
        kind = "context" if "earlier line" in user else "negative" if "cannot run" in user else "positive"
        items = [self._example(kind) for _ in range(k)]
        for ex in items:
            key = f"Earlier: {ex['context']}\nRequest: {ex['input']}" if "context" in ex else ex["input"]
            self.answers[key] = ex["output"]
        bad = self.FAULTS[self.batch_requests % 3](self._example("positive"))
        dup = {**items[0], "input": items[0]["input"].upper()}  # the same request again
        return "```json\n" + json.dumps(items + [bad, dup]) + "\n```"

    def ideal(self, user: str) -> str:
        request = user.split("Request:\n", 1)[1].rsplit("\n\nThe ideal answer", 1)[0]
        return json.dumps(self.answers.get(request, {"error": "unknown request"}))

    def rewrite(self, messages: list[dict]) -> str:
        """A note-guided rewrite (the chat's learning.rewriter = "teacher"), as a model that follows
        the note writes it: the rated answer, addressed with the phrase the note quotes."""
        self.rewrites.append(messages)
        quoted = re.search(r'"([^"]+)"', messages[-1]["content"])
        return f"{messages[-2]['content'].rstrip('.')}, {quoted.group(1) if quoted else 'corrected'}."

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send({"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.requests += 1
                if teacher.delay_after is not None and teacher.requests > teacher.delay_after:
                    time.sleep(teacher.delay_s)  # a slow teacher: the test kills the run meanwhile
                user = body["messages"][-1]["content"]
                if user.startswith("That answer was wrong:"):
                    text = teacher.rewrite(body["messages"])
                else:
                    text = teacher.ideal(user) if "The ideal answer" in user else teacher.batch(user)
                self._send(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                    }
                )

        return Handler
