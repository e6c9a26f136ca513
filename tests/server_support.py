"""Helpers of the server tests: a real server in a thread, raw HTTP, a test image server."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edge_vlm.config import Settings, load_settings
from edge_vlm.server.app import ServerApp
from edge_vlm.server.auth import AuthConfig
from edge_vlm.server.models import Loader
from edge_vlm.server.run import EdgeServer, create_server
from edge_vlm.testing import Pair

TOKEN = "test-token-0123456789"
NO_CONFIG = Path("/nonexistent/edge-vlm-test-config.toml")


def server_settings(paths: Pair | None, **overrides: Any) -> Settings:
    """Settings for a test server: the tiny model (or the shipped one), port 0, 2 threads."""
    base: dict[str, Any] = {"server.port": 0, "runtime.threads": 2}
    if paths is not None:
        base.update({"model.default": str(paths.model), "model.mmproj": str(paths.mmproj)})
    return load_settings({**base, **overrides}, config_file=NO_CONFIG)


@dataclass
class Running:
    """A server serving in a background thread."""

    server: EdgeServer
    thread: threading.Thread
    token: str | None

    @property
    def app(self) -> ServerApp:
        return self.server.app

    @property
    def url(self) -> str:
        return self.server.url()

    @property
    def port(self) -> int:
        return self.server.port

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every model being loaded is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [s.state for s in self.app.models.status()]
            if states and all(s == "ready" for s in states):
                return
            time.sleep(0.02)
        raise TimeoutError(f"models not ready: {self.app.models.status()}")

    def wait_record(self, predicate: Callable[[Any], bool], timeout: float = 30.0) -> Any:
        """The first request record matching ``predicate`` (they are logged at the end)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in list(self.app.records):
                if predicate(record):
                    return record
            time.sleep(0.02)
        raise TimeoutError("no such request record")

    def close(self) -> None:
        self.server.shutdown()
        self.app.close(timeout=10)
        self.server.server_close()
        self.thread.join(timeout=10)


def start_server(settings: Settings, *, token: str | None = TOKEN,
                 loader: Loader | None = None, ready: bool = True) -> Running:
    """Bind and serve; with ``ready``, wait for the default model."""
    server = create_server(settings, AuthConfig(token, "test"), loader=loader)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    running = Running(server, thread, token)
    if ready:
        running.wait_ready()
    return running


@contextlib.contextmanager
def serving(settings: Settings, **kwargs: Any) -> Iterator[Running]:
    running = start_server(settings, **kwargs)
    try:
        yield running
    finally:
        running.close()


# --- raw HTTP ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        data = self.json()
        assert "error" in data, data
        return dict(data["error"])


def call(port: int, method: str, path: str, body: Any = None, *,
         headers: dict[str, str] | None = None, raw: bytes | None = None,
         timeout: float = 60.0) -> Reply:
    """One request on a fresh connection (``body`` as JSON, or ``raw`` bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (
            json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def sse_events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body (``[DONE]`` as the string)."""
    out: list[Any] = []
    for line in body.decode().splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def data_url(path: Path) -> str:
    mime = {"png": "image/png", "jpg": "image/jpeg"}[path.suffix.lstrip(".")]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def question(url: str, text: str = "Describe this image in one sentence.") -> list[dict[str, Any]]:
    """The seed snippet's message: one image, then the question."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": text}]}]


def chat_body(url: str, **fields: Any) -> dict[str, Any]:
    return {"model": "default", "messages": question(url), "max_tokens": 8, **fields}


# --- a test image server ------------------------------------------------------------


@dataclass
class ImageServer:
    """Serves files and redirects on 127.0.0.1, recording every path requested."""

    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)
    httpd: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self) -> ImageServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append(self.path)
                path, _, arg = self.path.partition("?")
                if path == "/redirect":
                    self._send(302, b"", {"Location": arg})
                elif path in owner.files:
                    self._send(200, owner.files[path], {"Content-Type": "image/png"})
                else:
                    self._send(404, b"nope")

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None
                      ) -> None:
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        self.httpd = httpd
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def raw_http(port: int, data: bytes, *, pause_after: int | None = None,
             timeout: float = 20.0) -> tuple[int, bytes]:
    """Send bytes as they are, read the response until the server closes.

    Args:
        port: The server's port.
        data: The request, byte for byte.
        pause_after: Send only this many bytes, then wait for the answer (a slow client).
        timeout: Socket timeout.

    Returns:
        The status and the whole response.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data if pause_after is None else data[:pause_after])
        chunks: list[bytes] = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while piece := sock.recv(65536):
                chunks.append(piece)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
    return status, response


def request_bytes(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A POST as it goes on the wire."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def holding_model(running: Running) -> Iterator[None]:
    """Occupy the default model's turn, as a long generation would."""
    cancel = threading.Event()
    spec = running.app.models.default_spec()
    deadline = time.monotonic() + 120
    with running.app.models.lease(spec, wait=True, deadline=deadline, cancel=cancel) as lease, \
            lease.turn(deadline, cancel):
        yield


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


@contextlib.contextmanager
def isolated_home(home: Path) -> Iterator[Path]:
    """An empty model store (``EDGE_VLM_HOME``) and no user config, for the server's
    name resolution, while the block runs."""
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("EDGE_VLM_")]:
            mp.delenv(key)
        mp.setenv("EDGE_VLM_HOME", str(home))
        mp.setenv("EDGE_VLM_CONFIG", str(NO_CONFIG))
        yield home
