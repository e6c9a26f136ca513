"""Property-based, through the public HTTP contract: a real ``edge-vlm serve`` process on
loopback answers any hostile request with 200 or a 4xx carrying an OpenAI-style error
object, never a 5xx; the process stays alive and the next ordinary request answers as
before.

A longer run: ``EDGE_VLM_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_http.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz_support import fuzz_settings, requests
from tests.server_support import Reply, call, data_url

ROOT = Path(__file__).resolve().parent.parent
ORDINARY = {"model": "default", "messages": [{"role": "user", "content": "red square circle"}],
            "max_tokens": 6, "temperature": 0}
PATH = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    def post(self, body: bytes) -> Reply:
        # Hugging Face's header: answer from the model, not from the response cache.
        return call(self.port, "POST", PATH, raw=body, timeout=120,
                    headers={"x-use-cache": "false"})


@pytest.fixture(scope="module")
def server(tiny_paths: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("fuzz-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_VLM_")}
    env.update(EDGE_VLM_HOME=str(home), EDGE_VLM_CONFIG=str(home / "none.toml"),
               EDGE_VLM_STORE__CHECK_LOAD="false", EDGE_VLM_RUNTIME__THREADS="1",
               PYTHONPATH=str(ROOT))
    port = _free_port()
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_vlm.cli", "serve", "--model", str(tiny_paths.model),
         "--mmproj", str(tiny_paths.mmproj), "--port", str(port)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(proc, port)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
        try:
            if srv.post(json.dumps(ORDINARY).encode()).status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.3)
    yield srv
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def baseline(server: Server) -> str:
    reply = server.post(json.dumps(ORDINARY).encode())
    assert reply.status == 200
    return str(reply.json()["choices"][0]["message"]["content"])


def check(server: Server, body: bytes, baseline: str) -> None:
    reply = server.post(body)
    assert reply.status < 500, (reply.status, reply.body[:500], body[:500])
    if reply.status >= 400:
        error = reply.json()["error"]
        assert isinstance(error, dict) and str(error.get("message", "")).strip(), reply.body
    else:
        assert reply.status == 200, reply.status
    assert server.proc.poll() is None, "the server process died"
    again = server.post(json.dumps(ORDINARY).encode())
    assert again.status == 200
    assert again.json()["choices"][0]["message"]["content"] == baseline


def _bounded(request: dict[str, Any]) -> dict[str, Any]:
    if "max_tokens" not in request and "max_completion_tokens" not in request:
        request = {**request, "max_tokens": 4}
    return {"model": "default", **request}


def _encode(request: dict[str, Any]) -> bytes:
    # ensure_ascii: lone surrogates travel as "\ud800" escapes, as valid JSON allows;
    # allow_nan: NaN and Infinity travel as the literals some clients send.
    return json.dumps(request, ensure_ascii=True, allow_nan=True).encode()


@fuzz_settings(60)
@given(data=st.data())
def test_hostile_requests_over_http(server, images, baseline, data):
    urls = [data_url(images["red"])]
    request = _bounded(data.draw(requests(urls)))
    check(server, _encode(request), baseline)


@fuzz_settings(15)
@given(body=st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"messages": "\\ud800"}', b"\xff\xfe{}",
                     b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
                     b'{"messages": [], "max_tokens": 1e999}', b'{"a":' * 200])))
def test_malformed_bodies_over_http(server, baseline, body):
    check(server, body, baseline)
