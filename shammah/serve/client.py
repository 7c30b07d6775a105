"""Talk to a running ``shammah serve`` for the same home (``shammah ask`` and the chat use it, so
they cost no second model load). Standard library only: importing this must stay instant."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from shammah.errors import ShammahError


def _request(url: str, token: str, method: str, path: str, body: dict | None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.Request(f"{url}{path}", data=data, headers=headers, method=method)


def _open(req: urllib.request.Request, url: str, timeout: float):
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = f"HTTP {e.code}"
        raise ShammahError(f"the server at {url} answered: {msg}") from None
    except OSError as e:
        raise ShammahError(f"the server at {url} cannot be reached ({e}); is `shammah serve` still running?") from None


def call(url: str, token: str, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
    """One JSON request; an error answer becomes a ShammahError carrying the server's message."""
    with _open(_request(url, token, method, path, body), url, timeout) as resp:
        return json.loads(resp.read())


def stream_chat(url: str, token: str, body: dict, timeout: float = 600, meta: dict | None = None) -> Iterator[dict]:
    """POST a streaming chat completion; yield each SSE chunk (dicts) until [DONE]. ``meta`` gets
    the adapter that answers (the X-Shammah-Adapter header)."""
    resp = _open(_request(url, token, "POST", "/v1/chat/completions", {**body, "stream": True}), url, timeout)
    if meta is not None:
        name = resp.headers.get("X-Shammah-Adapter")
        meta["adapter"] = None if name in (None, "none") else name
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
