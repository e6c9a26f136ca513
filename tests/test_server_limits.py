"""Every limit and error status, x-wait-for-model, the queue, disconnects, 20 clients at once."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from edge_vlm.config import Settings
from edge_vlm.server.errors import ServiceUnavailableError
from edge_vlm.server.models import ModelManager, ModelSpec, load_vlm
from tests.server_support import (
    TOKEN,
    Running,
    call,
    chat_body,
    data_url,
    holding_model,
    isolated_home,
    question,
    raw_http,
    request_bytes,
    server_settings,
    serving,
    sse_events,
    start_server,
    wait_until,
)


@pytest.fixture(scope="module", autouse=True)
def _empty_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with isolated_home(tmp_path_factory.mktemp("home")) as home:
        yield home


CHAT = "/v1/chat/completions"
FRESH = {"x-use-cache": "false"}


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def tight(tiny_paths: Any) -> Iterator[Running]:
    """Small limits everywhere, and the smallest context llama.cpp gives (256 tokens)."""
    running = start_server(server_settings(tiny_paths, **{
        "server.max_body_bytes": 64 * 1024, "server.max_images_per_request": 2,
        "server.max_tokens_limit": 300, "server.max_json_depth": 8, "server.queue_size": 1,
        "server.read_timeout_s": 1.0, "images.max_bytes": 20_000,
        "images.max_pixels": 100 * 100, "runtime.n_ctx": 64}))
    yield running
    running.close()


@pytest.fixture(scope="module")
def roomy(tiny_paths: Any) -> Iterator[Running]:
    running = start_server(server_settings(tiny_paths))
    yield running
    running.close()


def post(running: Running, body: Any, **headers: str) -> Any:
    return call(running.port, "POST", CHAT, body, headers={**running.auth(), **FRESH, **headers})


# --- the body ---------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_declared_or_counted(tight: Running,
                                                        images: dict[str, Path]) -> None:
    big = json.dumps({**chat_body(data_url(images["red"])), "pad": "x" * 70_000}).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    status, response = raw_http(tight.port, request_bytes(
        tight.port, CHAT, big, {**headers, "Content-Length": str(len(big))}))
    assert status == 413 and b"max_body_bytes" in response
    # Chunked: no length announced; the count stops at the cap.
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 8192]), big[i:i + 8192])
                       for i in range(0, len(big), 8192)) + b"0\r\n\r\n"
    status, response = raw_http(tight.port, request_bytes(
        tight.port, CHAT, chunked, {**headers, "Transfer-Encoding": "chunked"}))
    assert status == 413 and b"chunked" in response
    # Expect: 100-continue: refused before the body is sent.
    status, _ = raw_http(tight.port, request_bytes(
        tight.port, CHAT, b"", {**headers, "Content-Length": "999999999",
                                "Expect": "100-continue"}))
    assert status == 413


def test_a_chunked_body_within_the_limit_works(tight: Running, images: dict[str, Path]) -> None:
    body = json.dumps(chat_body(data_url(images["red"]), max_tokens=2)).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, response = raw_http(tight.port, request_bytes(tight.port, CHAT, chunked, {
        "Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked",
        "Content-Type": "application/json", "Connection": "close"}))
    assert status == 200, response


def test_content_length_is_not_trusted_beyond_itself(tight: Running,
                                                     images: dict[str, Path]) -> None:
    body = json.dumps(chat_body(data_url(images["red"]))).encode()
    status, response = raw_http(tight.port, request_bytes(tight.port, CHAT, body, {
        "Authorization": f"Bearer {TOKEN}", "Content-Length": "20", "Connection": "close"}))
    assert status == 400 and b"not valid JSON" in response


def test_missing_length_is_411_and_a_slow_body_is_408(tight: Running) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _ = raw_http(tight.port, request_bytes(tight.port, CHAT, b"", auth))
    assert status == 411
    slow = request_bytes(tight.port, CHAT, b'{"messages": [', {**auth, "Content-Length": "500"})
    status, response = raw_http(tight.port, slow)  # 500 announced, 14 sent, then silence
    assert status == 408 and b"read_timeout_s" in response


@pytest.mark.parametrize("raw,what", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"hello"', "must be a JSON object"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b'{"messages": [[[[[[[[[[]]]]]]]]]]}', "max_json_depth"),
    (b"[" * 60_000 + b"]" * 10, "max_json_depth"),  # deeper than Python's recursion limit
])
def test_unreadable_bodies_are_400(tight: Running, raw: bytes, what: str) -> None:
    r = call(tight.port, "POST", CHAT, raw=raw, headers=tight.auth())
    assert r.status == 400, r.body
    assert what in r.error["message"] and r.error["type"] == "invalid_request_error"


# --- validation (400, as OpenAI answers) and request limits --------------------------------


def test_invalid_fields_are_400_naming_the_field(tight: Running, images: dict[str, Path]) -> None:
    url = data_url(images["red"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "default"}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0].image_url.url"),
        ({**chat_body(url), "temperature": 5}, "temperature"),
        ({**chat_body(url), "n": 3}, "n"),
        ({**chat_body(url), "max_tokens": 301}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}] * 3}]}, "messages[0].content[2]"),
    ]
    for body, param in cases:
        r = post(tight, body)
        assert r.status == 400, (param, r.body)
        assert r.error["param"] == param and r.error["message"].startswith(param)
        assert set(r.error) == {"message", "type", "param", "code"}
    # The OpenAI SDK raises its BadRequestError, carrying the field.
    client = openai.OpenAI(base_url=f"{tight.url}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=question(url),  # type: ignore[arg-type]
                                       max_tokens=2, temperature=5)
    assert err.value.param == "temperature" and "temperature" in err.value.message


def test_image_limits_and_formats(tight: Running) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 90, 3), np.uint8))
    field = "messages[0].content[0].image_url.url"
    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='x'></svg>").decode()
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    cases = [
        (png_url(noise), 413, "max_bytes"),                             # ~24 KB > 20 000 bytes
        (png_url(Image.new("RGB", (200, 200), "red")), 413, "pixel"),   # 40 000 > 10 000 pixels
        (svg, 415, "SVG"),
        ("data:image/tiff;base64," + base64.b64encode(tiff.getvalue()).decode(), 415, "TIFF"),
        ("data:image/png;base64,@@@", 400, "base64"),
    ]
    for url, status, what in cases:
        r = post(tight, chat_body(url))
        assert r.status == status, (what, r.body)
        assert r.error["param"] == field and what in r.error["message"]


def test_context_overflow_is_400_before_any_token(tight: Running, images: dict[str, Path]) -> None:
    r = post(tight, chat_body(data_url(images["red"]), max_tokens=250))  # 34 + 250 > 256
    assert r.status == 400 and r.error["code"] == "context_overflow"
    assert "n_ctx" in r.error["message"]


def test_unknown_routes_and_methods(tight: Running) -> None:
    r = call(tight.port, "GET", "/v2/whatever", headers=tight.auth())
    assert r.status == 404 and r.error["type"] == "not_found_error"
    r = call(tight.port, "GET", CHAT, headers=tight.auth())
    assert r.status == 405 and "POST" in r.headers["allow"]
    r = call(tight.port, "DELETE", "/v1/models", headers=tight.auth())
    assert r.status == 405


# --- the queue ----------------------------------------------------------------------------------


def test_full_queue_is_503_with_retry_after(tight: Running, images: dict[str, Path]) -> None:
    body = chat_body(data_url(images["blue"]), max_tokens=3)
    waiting: list[Any] = []
    with holding_model(tight):
        thread = threading.Thread(target=lambda: waiting.append(post(tight, body)))
        thread.start()  # queue_size = 1: this one waits ...
        wait_until(lambda: tight.app.models.status()[0].users == 2)
        r = post(tight, body)  # ... and this one finds the queue full
        assert r.status == 503 and r.error["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        assert not waiting
    thread.join(timeout=60)
    assert waiting and waiting[0].status == 200  # the waiting one ran once the model was free


def test_request_timeout_in_the_queue_is_503_and_in_generation_504(
        tiny_paths: Any, images: dict[str, Path]) -> None:
    settings = server_settings(tiny_paths, **{"server.request_timeout_s": 1.0})
    with serving(settings) as running:
        with holding_model(running):
            r = post(running, chat_body(data_url(images["red"]), max_tokens=4))
        assert r.status == 503 and r.error["code"] == "queue_timeout"
        assert "request_timeout_s" in r.error["message"]
        # Held for most of its second, the request gets 0.3 s for 950 tokens: it is stopped.
        result: list[Any] = []
        with holding_model(running):
            thread = threading.Thread(target=lambda: result.append(
                post(running, chat_body(data_url(images["red"]), max_tokens=950))))
            thread.start()
            time.sleep(0.7)
        thread.join(timeout=60)
        assert result[0].status == 504, result[0].body
        assert result[0].error["code"] == "generation_timeout"
        record = running.wait_record(lambda r: r.status == 504)
        assert record.outcome.finish_reason == "cancelled"
        assert record.outcome.completion_tokens < 950
        # Streaming, the error comes after the stream started: an error event, then [DONE].
        result.clear()
        body = chat_body(data_url(images["blue"]), max_tokens=950, stream=True)
        with holding_model(running):
            thread = threading.Thread(target=lambda: result.append(post(running, body)))
            thread.start()
            time.sleep(0.7)
        thread.join(timeout=60)
        assert result[0].status == 200
        events = sse_events(result[0].body)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "generation_timeout"
        assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2])
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=TOKEN, max_retries=0)
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                for _ in client.chat.completions.create(
                        model="default", messages=question(data_url(images["green"])),  # type: ignore[arg-type]
                        max_tokens=950, stream=True, extra_headers=FRESH):
                    pass
            except openai.APIError as err:
                errors.append(err)

        with holding_model(running):
            thread = threading.Thread(target=consume)
            thread.start()
            time.sleep(0.7)
        thread.join(timeout=60)
        assert errors and "took longer than 1 s" in str(errors[0])
        assert not isinstance(errors[0], openai.APIStatusError)  # an event, not a status


# --- x-wait-for-model ---------------------------------------------------------------------------


def gated_loader(gate: threading.Event) -> Any:
    def load(spec: ModelSpec, settings: Settings) -> Any:
        if not gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return load_vlm(spec, settings)
    return load


def test_loading_model_is_503_unless_the_client_waits(tiny_paths: Any,
                                                      images: dict[str, Path]) -> None:
    gate = threading.Event()
    body = chat_body(data_url(images["red"]), max_tokens=3)
    with serving(server_settings(tiny_paths), loader=gated_loader(gate), ready=False) as running:
        health = call(running.port, "GET", "/health")
        assert health.status == 503 and health.json()["status"] == "loading"
        r = post(running, body)
        assert r.status == 503 and r.error["code"] == "model_loading"
        assert r.json()["estimated_time"] > 0 and int(r.headers["retry-after"]) >= 1
        assert "x-wait-for-model" in r.error["message"]
        waited: list[Any] = []
        thread = threading.Thread(target=lambda: waited.append(
            post(running, body, **{"x-wait-for-model": "true"})))
        thread.start()
        wait_until(lambda: running.app.models.status()[0].users == 1)
        assert not waited
        gate.set()
        thread.join(timeout=60)
        assert waited[0].status == 200, waited[0].body
        assert call(running.port, "GET", "/health").status == 200


def test_waiting_for_a_model_is_bounded(tiny_paths: Any, images: dict[str, Path]) -> None:
    gate = threading.Event()
    settings = server_settings(tiny_paths, **{"server.wait_for_model_timeout_s": 0.3})
    try:
        with serving(settings, loader=gated_loader(gate), ready=False) as running:
            r = post(running, chat_body(data_url(images["red"])), **{"x-wait-for-model": "true"})
            assert r.status == 503 and "still loading" in r.error["message"]
            gate.set()
    finally:
        gate.set()


def test_one_resident_model_swaps_when_idle(tiny_paths: Any, tmp_path: Path,
                                            images: dict[str, Path]) -> None:
    from edge_vlm.testing import FAMILIES, write_pair

    other = write_pair(FAMILIES["generic"], tmp_path, seed=1, prefix="other-")
    settings = server_settings(tiny_paths, **{"server.max_loaded_models": 1})
    manager = ModelManager(settings)
    a = manager.default_spec()
    b = ModelSpec("other-model", str(other.model), str(other.mmproj), other.model, other.mmproj)
    cancel = threading.Event()
    try:
        deadline = time.monotonic() + 60
        with manager.lease(a, wait=True, deadline=deadline, cancel=cancel), \
                pytest.raises(ServiceUnavailableError, match="busy"), \
                manager.lease(b, wait=False, deadline=deadline, cancel=cancel):
            pass
        with manager.lease(b, wait=True, deadline=deadline, cancel=cancel) as lease, \
                lease.turn(deadline, cancel) as vlm:
            reply = vlm.chat(question(data_url(images["red"])), max_tokens=2)
            assert reply.model == "other-model" and reply.usage.completion_tokens == 2
        assert [s.name for s in manager.status()] == ["other-model"]
    finally:
        manager.close()


# --- faults ------------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_model(roomy: Running, images: dict[str, Path]) -> None:
    body = json.dumps(chat_body(data_url(images["green"]), max_tokens=900, stream=True)).encode()
    sock = socket.create_connection(("127.0.0.1", roomy.port), timeout=60)
    sock.sendall(request_bytes(roomy.port, CHAT, body, {
        **roomy.auth(), **FRESH, "Content-Type": "application/json",
        "Content-Length": str(len(body))}))
    seen = b""
    while seen.count(b'"content"') < 4:
        piece = sock.recv(4096)
        assert piece, seen
        seen += piece
    sock.close()  # the client leaves mid-answer
    nxt = post(roomy, chat_body(data_url(images["red"]), max_tokens=2))
    assert nxt.status == 200
    record = roomy.wait_record(lambda r: r.status == 499)
    assert record.outcome.finish_reason in (None, "cancelled")
    tokens = record.outcome.completion_tokens
    assert tokens is None or tokens < 450, f"generation ran on for {tokens} tokens"


def test_twenty_concurrent_clients_get_answers_or_clean_503s(roomy: Running,
                                                             images: dict[str, Path],
                                                             tiny_vlm: Any) -> None:
    keys = ["red", "blue", "green"]
    want = {k: tiny_vlm.chat(question(data_url(images[k])), max_tokens=8)
            .choices[0].message.content for k in keys}
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        key = keys[i % 3]
        client = openai.OpenAI(base_url=f"{roomy.url}/v1", api_key=TOKEN, max_retries=0,
                               timeout=120)
        try:
            reply = client.chat.completions.create(
                model="default", messages=question(data_url(images[key])),  # type: ignore[arg-type]
                max_tokens=8, extra_headers=FRESH)
            results[i] = ("ok", key, reply.choices[0].message.content)
        except openai.APIStatusError as err:
            results[i] = (err.status_code, err.response.headers.get("retry-after"), err.body)
        except Exception as err:  # reported below
            results[i] = ("error", type(err).__name__, str(err))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert len(results) == 20, "a client hung"
    oks = [r for r in results.values() if r[0] == "ok"]
    others = [r for r in results.values() if r[0] != "ok"]
    for _, key, text in oks:
        assert text == want[key]
    for status, retry_after, _ in others:
        assert status == 503 and retry_after and int(retry_after) >= 1, others
    assert len(oks) >= roomy.app.settings.server.queue_size + 1
    assert call(roomy.port, "GET", "/health").status == 200
    assert post(roomy, chat_body(data_url(images["red"]), max_tokens=2)).status == 200


def test_one_worker_per_model_and_waiting_holds_no_thread(roomy: Running,
                                                          images: dict[str, Path]) -> None:
    import sys

    def in_turnstile() -> list[int]:
        """The threads blocked waiting for a model's turn."""
        found = []
        for ident, frame in sys._current_frames().items():
            f: Any = frame
            while f is not None:
                if f.f_code.co_name == "enter" and "turnstile" in f.f_code.co_filename:
                    found.append(ident)
                    break
                f = f.f_back
        return found

    body = chat_body(data_url(images["blue"]), max_tokens=2)
    results: list[Any] = []
    with holding_model(roomy):
        threads = [threading.Thread(target=lambda: results.append(post(roomy, body)))
                   for _ in range(5)]
        for t in threads:
            t.start()
        wait_until(lambda: roomy.app.models.status()[0].users == 6)
        time.sleep(0.2)
        # Five requests wait; only the model's worker waits for the turn, on their behalf.
        entry = next(iter(roomy.app.models._entries.values()))
        assert in_turnstile() == [entry.worker._thread.ident]
    for t in threads:
        t.join(timeout=60)
    assert [r.status for r in results] == [200] * 5
