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

    @classmethod
    def from_config(cls, pc) -> Teacher:
        """The teacher ``pc`` (the config's ``pipeline`` section) names; TeacherError if none is set."""
        if not pc.teacher_url:
            raise TeacherError(
                "no teacher: set pipeline.teacher_url (or --teacher-url) to an OpenAI-compatible API root, "
                "e.g. http://127.0.0.1:8000/v1 for a `shammah serve` running a larger model"
            )
        return cls(pc.teacher_url, pc.teacher_model or first_model(pc.teacher_url, pc.teacher_key), pc.teacher_key)

    def ask(self, system: str, user: str, temperature: float | None = None) -> str:
        """One chat completion's text; a connection failure is retried once."""
        return self.chat([{"role": "system", "content": system}, {"role": "user", "content": user}], temperature)

    def chat(self, messages: list[dict], temperature: float | None = None) -> str:
        """The completion's text for a whole conversation (``messages``: role/content dicts)."""
        body = {
            "model": self.model,
            "messages": messages,
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


def first_model(url: str, key: str) -> str:
    """The first model an OpenAI-compatible endpoint lists (GET /models)."""
    req = urllib.request.Request(f"{url.rstrip('/')}/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["data"][0]["id"]
    except OSError as e:
        raise TeacherError(f"cannot reach the teacher at {url} ({e}); check pipeline.teacher_url") from None
    except (ValueError, KeyError, IndexError) as e:
        raise TeacherError(f"no pipeline.teacher_model set and {url}/models did not list one ({e})") from None


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
