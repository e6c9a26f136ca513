"""Soak test of ``edge-vlm serve``: many mixed requests from concurrent clients.

Starts a real server (a child process: ``python -m edge_vlm.cli serve``) on loopback with
the tiny test model, sends ``--requests`` requests from ``--clients`` threads, a mix of
valid chat completions (plain and streamed, OpenAI SDK), invalid ones (bad JSON, bad
fields, unknown model, wrong token), raw-byte garbage, and streams the client abandons
mid-answer; then one valid request. Reports the status counts and the server's threads,
open file descriptors and RSS after warm-up and at the end, as JSON on stdout.

    python benchmarks/server_soak.py                      # 1,000 requests, 16 clients
    python benchmarks/server_soak.py --requests 100       # the CI slice (tests/test_server_soak.py)

Exit status 1 when the run breaks a promise: a 5xx other than a clean 503, a client that
hung, threads or fds that grew, RSS that grew more than 10%, or no answer at the end.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TOKEN = "soak-token-0123456789"


def _png(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = [_png(c) for c in ("red", "green", "blue", "white")]


def _body(rng: random.Random, **extra: Any) -> dict[str, Any]:
    return {"model": "default", "max_tokens": rng.randint(1, 8), "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": rng.choice(IMAGES)}},
            {"type": "text", "text": "Describe this image in one sentence."}]}], **extra}


def _request(port: int, method: str, path: str, data: bytes | None,
             headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _abandoned_stream(port: int, rng: random.Random) -> int:
    """Start a long streamed answer, read a little, leave."""
    data = json.dumps(_body(rng, stream=True, max_tokens=400)).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                      f"x-use-cache: false\r\nContent-Length: {len(data)}\r\n\r\n").encode()
                     + data)
        seen = sock.recv(4096)
    return int(seen.split(b" ", 2)[1]) if seen.startswith(b"HTTP/") else 0


def _garbage(port: int, rng: random.Random) -> int:
    payload = rng.choice([
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
        b"chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HELLO\r\n\r\n",
        b"GET http://evil.example/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        try:
            head = sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            return 0
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0


def one(port: int, kind: str, rng: random.Random) -> int:
    """Send one request of ``kind``; its HTTP status (0: connection closed, no status)."""
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    chat = "/v1/chat/completions"
    if kind == "valid":
        return _request(port, "POST", chat, json.dumps(_body(rng)).encode(),
                        {**auth, "x-use-cache": rng.choice(["true", "false"])})[0]
    if kind == "stream":
        status, body = _request(port, "POST", chat,
                                json.dumps(_body(rng, stream=True)).encode(), auth)
        if status == 200 and not body.rstrip().endswith(b"data: [DONE]"):
            return 599  # a stream that did not end properly
        return status
    if kind == "invalid":
        data = rng.choice([b"{not json", json.dumps({"messages": []}).encode(),
                           json.dumps(_body(rng, temperature=9)).encode(),
                           json.dumps(_body(rng, model="nobody/nothing")).encode()])
        return _request(port, "POST", chat, data, auth)[0]
    if kind == "unauthorized":
        return _request(port, "GET", "/v1/models", None, {"Authorization": "Bearer nope"})[0]
    if kind == "abandon":
        return _abandoned_stream(port, rng)
    return _garbage(port, rng)


KINDS = ["valid"] * 5 + ["stream"] * 3 + ["invalid"] * 4 + ["unauthorized", "abandon",
                                                             "abandon", "garbage"]


def start_server(home: Path, model: Path, mmproj: Path) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_VLM_")}
    env.update({"EDGE_VLM_HOME": str(home), "EDGE_VLM_CONFIG": str(home / "absent.toml"),
                "EDGE_VLM_SERVER__TOKEN": TOKEN, "EDGE_VLM_RUNTIME__THREADS": "1",
                "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_vlm.cli", "serve", "--port", "0", "--model", str(model),
         "--mmproj", str(mmproj)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, cwd=REPO, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(found.group(1))


def measure(pid: int) -> dict[str, float]:
    p = psutil.Process(pid)
    return {"threads": p.num_threads(), "fds": p.num_fds(),
            "rss_mb": round(p.memory_info().rss / 2**20, 1)}


def run_phase(port: int, requests: int, clients: int, seed: int) -> Counter[str]:
    """Send ``requests`` mixed requests from ``clients`` threads; ``kind:status`` counts
    (and ``hung``: clients that did not finish)."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    todo = iter(range(requests))

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            kind = rng.choice(KINDS)
            try:
                status = one(port, kind, rng)
            except (OSError, http.client.HTTPException) as exc:
                status = 0 if kind in ("garbage", "abandon") else -1
                if status == -1:
                    print(f"{kind}: {type(exc).__name__}: {exc}", file=sys.stderr)
            with lock:
                counts[f"{kind}:{status}"] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    hung = sum(t.is_alive() for t in threads)
    if hung:
        counts["hung"] = hung
    return counts


def soak(requests: int, clients: int, seed: int = 0) -> dict[str, Any]:
    """Run the soak; the report (see the module docstring)."""
    from edge_vlm.testing import tiny_pair

    with tempfile.TemporaryDirectory() as tmp:
        paths = tiny_pair("generic", tmp)
        proc, port = start_server(Path(tmp) / "home", paths.model, paths.mmproj)
        try:
            deadline = time.monotonic() + 120
            while _request(port, "GET", "/health", None, {})[0] != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the model never became ready")
                time.sleep(0.1)
            # Warm-up at the same concurrency: the server's bounded thread pools fill up
            # and the allocator settles; growth is measured from there.
            warm = run_phase(port, max(requests // 2, 16 * clients), clients, seed + 1)
            time.sleep(3.0)
            before = measure(proc.pid)
            started = time.monotonic()
            counts = run_phase(port, requests, clients, seed)
            hung = counts.pop("hung", 0)
            seconds = time.monotonic() - started
            time.sleep(3.0)  # abandoned generations end, keep-alive connections close
            after = measure(proc.pid)
            final = _request(port, "POST", "/v1/chat/completions",
                             json.dumps(_body(random.Random(1))).encode(),
                             {"Authorization": f"Bearer {TOKEN}",
                              "Content-Type": "application/json", "x-use-cache": "false"})[0]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    statuses = Counter(int(k.rsplit(":", 1)[1]) for k in counts.elements())
    bad = {k: v for k, v in counts.items()
           if (int(k.rsplit(":", 1)[1]) >= 500 and not k.endswith(":503"))
           or k.endswith(":-1")}
    report = {
        "requests": sum(counts.values()), "clients": clients, "seconds": round(seconds, 1),
        "by_kind_and_status": dict(sorted(counts.items())),
        "statuses": dict(sorted(statuses.items())), "server_errors": bad, "hung_clients": hung,
        "warmup": dict(sorted(warm.items())), "before": before, "after": after,
        "final_status": final,
    }
    report["ok"] = (not bad and hung == 0 and final == 200
                    and after["threads"] <= before["threads"]
                    and after["fds"] <= before["fds"]
                    and after["rss_mb"] <= before["rss_mb"] * 1.10)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    report = soak(args.requests, args.clients, args.seed)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
