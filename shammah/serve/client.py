"""Talk to a running ``shammah serve`` for the same home (``shammah ask`` uses it, so a one-shot
answer costs no model load). Standard library only: importing this must stay instant."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from shammah.errors import ShammahError


def stream_chat(url: str, token: str, body: dict, timeout: float = 600) -> Iterator[dict]:
    """POST a streaming chat completion; yield each SSE chunk (dicts) until [DONE]."""
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = f"HTTP {e.code}"
        raise ShammahError(f"the server at {url} answered: {msg}") from None
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return
            yield json.loads(data)


def running_server(root: Path) -> dict | None:
    """The server running for the home at ``root`` ({"pid", "url", "model"}), if one is up."""
    from shammah.jobs import alive

    try:
        info = json.loads((root / "serve.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not alive(info["pid"]):
        return None
    return info


def reachable(url: str, timeout: float = 0.5) -> bool:
    """The server answers and its model has loaded."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return json.loads(r.read()).get("status") == "ok"
    except (OSError, ValueError):
        return False
