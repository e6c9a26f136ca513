"""The HTTP layer under abuse: raw bytes a hand-written parser got wrong, slow clients, many
connections. Each answer is a 4xx or a closed connection, never a 500, and the server
still answers a valid request afterwards."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server_support import (
    TOKEN,
    Running,
    call,
    chat_body,
    data_url,
    isolated_home,
    raw_http,
    server_settings,
    start_server,
)


@pytest.fixture(scope="module", autouse=True)
def _empty_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with isolated_home(tmp_path_factory.mktemp("home")) as home:
        yield home


@pytest.fixture(scope="module")
def srv(tiny_paths: Any) -> Iterator[Running]:
    running = start_server(server_settings(tiny_paths, **{"server.read_timeout_s": 2.0}))
    yield running
    running.close()


def still_answers(running: Running, images: dict[str, Path]) -> None:
    r = call(running.port, "POST", "/v1/chat/completions",
             chat_body(data_url(images["red"]), max_tokens=2),
             headers={**running.auth(), "x-use-cache": "false"})
    assert r.status == 200, r.body


def raw(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    return raw_http(port, head.replace("PORT", str(port)).replace("\n", "\r\n").encode() + body)


AUTH = f"Authorization: Bearer {TOKEN}\n"
POST = "POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1:PORT\n" + AUTH


@pytest.mark.parametrize("what,head,body", [
    ("a chunk size that is not hex", POST + "Transfer-Encoding: chunked\n\n",
     b"zz\r\n{}\r\n0\r\n\r\n"),
    ("a negative chunk size", POST + "Transfer-Encoding: chunked\n\n", b"-5\r\n{}\r\n0\r\n\r\n"),
    ("a chunk longer than its size line", POST + "Transfer-Encoding: chunked\n\n",
     b"2\r\n{}}}}\r\n0\r\n\r\n"),
    ("two different Content-Lengths", POST + "Content-Length: 2\nContent-Length: 7\n\n", b"{}"),
    ("a Content-Length that is not a number", POST + "Content-Length: 2x\n\n", b"{}"),
    ("a negative Content-Length", POST + "Content-Length: -1\n\n", b"{}"),
    ("Content-Length and chunked at once (smuggling)",
     POST + "Content-Length: 4\nTransfer-Encoding: chunked\n\n", b"0\r\n\r\n"),
    ("an unknown transfer coding", POST + "Transfer-Encoding: gzip\n\n", b"{}"),
    ("two Host headers", "GET /v1/models HTTP/1.1\nHost: 127.0.0.1:PORT\nHost: evil.example\n"
     + AUTH + "\n", b""),
    ("no Host header in HTTP/1.1", "GET /v1/models HTTP/1.1\n" + AUTH + "\n", b""),
    ("an absolute-form target", "GET http://evil.example/v1/models HTTP/1.1\n"
     "Host: 127.0.0.1:PORT\n" + AUTH + "\n", b""),
    ("a request line that is not HTTP", "HELLO\n\n", b""),
    ("a header without a colon", "GET /health HTTP/1.1\nHost: 127.0.0.1:PORT\nnocolon\n\n", b""),
    ("a header line over h11's limit", "GET /health HTTP/1.1\nHost: 127.0.0.1:PORT\nX-Big: "
     + "a" * 40_000 + "\n\n", b""),
], ids=lambda v: v if isinstance(v, str) and len(v) < 60 and "\n" not in v else "")
def test_malformed_requests_get_a_4xx_or_a_closed_connection(
        srv: Running, images: dict[str, Path], what: str, head: str, body: bytes) -> None:
    status, response = raw(srv.port, head, body)
    assert status == 0 or 400 <= status < 500, (what, response[:300])
    assert b"Traceback" not in response
    still_answers(srv, images)


def test_a_smuggled_request_in_chunk_trailers_is_not_run(srv: Running) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    # A trailer section carrying what looks like a second request: it is trailer data.
    chunked = (b"%x\r\n%s\r\n0\r\nX-Smuggled: 1\r\nGET /v1/models HTTP/1.1\r\n\r\n"
               % (len(body), body))
    before = len(srv.app.records)
    status, response = raw(srv.port, POST + "Transfer-Encoding: chunked\nConnection: close\n"
                           "x-use-cache: false\n\n", chunked)
    assert status == 0 or status < 500, response[:300]
    time.sleep(0.3)
    paths = [r.path for r in list(srv.app.records)[before:]]
    assert "/v1/models" not in paths, paths


def test_slow_headers_get_408_and_the_connection_closed(srv: Running) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        started = time.monotonic()
        data = b""
        while piece := sock.recv(4096):
            data += piece
        waited = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408") and b"read_timeout_s" in data
    assert waited < 15  # closed by the server (read_timeout_s = 2), not by our timeout


def test_an_idle_connection_is_closed(srv: Running) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
        assert sock.recv(10) in (b"", b"HTTP/1.1 4")  # closed without a request sent


def test_many_slow_clients_do_not_stop_a_legitimate_request(
        tiny_paths: Any, images: dict[str, Path]) -> None:
    """500 clients trickling their headers hold 500 connections (over select()'s 1024 fds
    with the server's side counted); a real client is still answered meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"needs 1400 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    settings = server_settings(tiny_paths, **{"server.read_timeout_s": 60.0})
    running = start_server(settings)
    slow: list[socket.socket] = []
    try:
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=30)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(sock)
        assert call(running.port, "GET", "/health").status == 200
        still_answers(running, images)
        for sock in slow[:50]:  # still held open: nothing was answered to them
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.close()
        running.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_leaving_a_whole_answer_frees_the_model(tiny_paths: Any,
                                                         images: dict[str, Path]) -> None:
    """Not streamed: nothing is written until the end, and still the disconnect is seen
    (ASGI's http.disconnect) and the generation stops within a token."""
    # A long answer (the tiny model writes a few thousand tokens a second on an idle
    # machine), so that it is still running when the client leaves.
    running = start_server(server_settings(tiny_paths, **{"runtime.n_ctx": 16384,
                                                          "server.max_tokens_limit": 16000}))
    try:
        _leave_a_whole_answer(running, images)
    finally:
        running.close()


def _leave_a_whole_answer(srv: Running, images: dict[str, Path]) -> None:
    body = json.dumps(chat_body(data_url(images["green"]), max_tokens=16000)).encode()
    earlier = {r.request_id for r in list(srv.app.records)}
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: Bearer {TOKEN}\r\nx-use-cache: false\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  ).encode() + body)
    time.sleep(0.3)
    sock.close()
    record = srv.wait_record(lambda r: r.status == 499 and r.request_id not in earlier
                             and r.outcome.model != "-")
    assert record.outcome.finish_reason == "cancelled"
    assert record.outcome.completion_tokens is not None
    assert record.outcome.completion_tokens < 16000
    still_answers(srv, images)
