"""`shammah serve` under load, beside llama-cpp-python's OpenAI-compatible server on the same GGUF.

Both servers get the same bounded load on loopback: a fixed number of short non-streaming chat
completions (greedy, a few dozen tokens each) from a fixed number of concurrent clients. Printed:
requests/s, p50/p95 latency, completion tokens/s and the server's resident memory after the run,
with shammah's figures as ratios of llama.cpp's; then `shammah ask` answered through the warm
server vs loading the model itself.

    .venv/bin/python bench/serve.py                       # 32 requests, 4 clients, 32 tokens each
    .venv/bin/python bench/serve.py --requests 64 --clients 8 --tokens 16

llama-cpp-python comes from the bench's own cached environment (bench/decode.py
--install-llama-cpp builds it; its [server] extra is added here when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decode import CACHE, LLAMA_VENV, PROMPTS  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, path: str, ok, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if ok(json.loads(r.read())):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def load(url: str, model: str, requests: int, clients: int, tokens: int) -> dict:
    """``requests`` completions from ``clients`` threads; latencies and throughput."""
    todo = list(range(requests))
    lock = threading.Lock()
    lat: list[float] = []
    completion = [0]

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": tokens,
                "temperature": 0.0,
            }
            t0 = time.perf_counter()
            r = post(url, body)
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                completion[0] += r["usage"]["completion_tokens"]

    post(url, {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "rps": requests / wall,
        "p50": statistics.median(lat),
        "p95": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))],
        "tok_s": completion[0] / wall,
    }


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)

    from shammah.engine.resolve import embedded_gguf
    from shammah.paths import Paths

    home = Path(tempfile.mkdtemp(prefix="shammah-serve-bench-"))
    paths = Paths(home).ensure()
    paths.cache.rmdir()
    CACHE.mkdir(parents=True, exist_ok=True)
    paths.cache.symlink_to(CACHE)  # the converted embedded model, kept between runs
    env = dict(os.environ, SHAMMAH_HOME=str(home), SHAMMAH_THREADS=str(args.threads))
    print(
        f"{args.requests} non-streaming completions of {args.tokens} tokens, {args.clients} concurrent clients, "
        f"{args.threads} threads, loopback\n"
    )
    rows = {}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shammah", "serve", "--model", "embedded", "--port", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.perf_counter()
        wait_up(url, proc, "/health", lambda j: j.get("status") == "ok")
        start_s = time.perf_counter() - t0
        rows["shammah serve"] = load(url, "shammah", args.requests, args.clients, args.tokens)
        rows["shammah serve"]["rss"] = rss_mb(proc.pid)
        rows["shammah serve"]["start"] = start_s
        # a one-shot `shammah ask` through the warm server
        ask = [sys.executable, "-m", "shammah", "ask", "-n", "16", "-t", "0", "What is the capital of France?"]
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(ask, env=env, capture_output=True, check=True)
            warm.append(time.perf_counter() - t0)
    finally:
        stop(proc)
    t0 = time.perf_counter()
    subprocess.run(ask, env=env, capture_output=True, check=True)
    cold = time.perf_counter() - t0

    py = LLAMA_VENV / "bin" / "python"
    if py.exists():
        has_server = subprocess.run([str(py), "-c", "import llama_cpp.server.app"], capture_output=True).returncode
        if has_server != 0:
            subprocess.run([str(py), "-m", "pip", "install", "-q", "llama-cpp-python[server]==0.3.36"], check=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [str(py), "-m", "llama_cpp.server", "--model", str(embedded_gguf()), "--host", "127.0.0.1"]
            + ["--port", str(port), "--n_threads", str(args.threads), "--n_ctx", "2048"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            t0 = time.perf_counter()
            wait_up(url, proc, "/v1/models", lambda j: bool(j.get("data")))
            start_s = time.perf_counter() - t0
            rows["llama-cpp-python server"] = load(url, "x", args.requests, args.clients, args.tokens)
            rows["llama-cpp-python server"]["rss"] = rss_mb(proc.pid)
            rows["llama-cpp-python server"]["start"] = start_s
        finally:
            stop(proc)
    else:
        print("(llama-cpp-python is not installed: bench/decode.py --install-llama-cpp builds it)\n")

    print(f"{'server':<26} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'tok/s':>7} {'RSS MB':>8} {'start s':>8}")
    for name, r in rows.items():
        print(
            f"{name:<26} {r['rps']:7.2f} {r['p50']:7.2f} {r['p95']:7.2f} {r['tok_s']:7.1f} {r['rss']:8.0f} "
            f"{r['start']:8.1f}"
        )
    if len(rows) == 2:
        s, ll = rows["shammah serve"], rows["llama-cpp-python server"]
        print(
            f"\nshammah / llama.cpp: req/s {s['rps'] / ll['rps']:.2f}x, p50 {s['p50'] / ll['p50']:.2f}x, "
            f"p95 {s['p95'] / ll['p95']:.2f}x, memory {s['rss'] / ll['rss']:.2f}x"
        )
    print(
        f"\nshammah ask (16 tokens): through the warm server {statistics.median(warm):.2f} s, "
        f"loading the model itself {cold:.2f} s ({cold / statistics.median(warm):.1f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
