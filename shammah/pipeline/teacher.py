"""The teacher: any OpenAI-compatible chat-completions endpoint (a hosted model, a local vLLM or
llama.cpp server, or `shammah serve`). Standard library only."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from shammah.errors import ShammahError


class TeacherError(ShammahError):
    pass


@dataclass(frozen=True)
class Teacher:
    url: str  # the API root, e.g. http://127.0.0.1:8000/v1
    model: str
    key: str = ""
    temperature: float = 0.8
    timeout: float = 300

    def ask(self, system: str, user: str, temperature: float | None = None) -> str:
        """One chat completion's text; a connection failure is retried once."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": self.temperature if temperature is None else temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(
            f"{self.url.rstrip('/')}/chat/completions", data=json.dumps(body).encode(), headers=headers
        )
        for attempt in (1, 2):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                raise TeacherError(f"the teacher at {self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == 2:
                    raise TeacherError(
                        f"cannot reach the teacher at {self.url} ({e}); set pipeline.teacher_url "
                        "(or --teacher-url) to an OpenAI-compatible endpoint"
                    ) from None
                time.sleep(1)
            except (ValueError, KeyError, IndexError, TypeError):
                raise TeacherError(f"the teacher at {self.url} sent an answer that is not a chat completion") from None
        raise AssertionError("unreachable")


FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```\s*$")


def parse_json(text: str):
    """The JSON in a model's answer (a markdown fence around it is allowed); ValueError if none."""
    text = FENCE.sub("", text.strip())
    try:
        return json.loads(text)
    except ValueError:
        pass
    for open_, close in (("[", "]"), ("{", "}")):  # the JSON inside a sentence around it
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            return json.loads(text[i : j + 1])
    raise ValueError("no JSON in the answer")
