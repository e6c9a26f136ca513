"""What real clients send, answered as they expect: the gaps the first server left."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.server_support import (
    TOKEN,
    ImageServer,
    Running,
    call,
    chat_body,
    data_url,
    isolated_home,
    question,
    server_settings,
    serving,
    sse_events,
    start_server,
    wait_until,
)

CHAT = "/v1/chat/completions"
FRESH = {"x-use-cache": "false"}


@pytest.fixture(scope="module", autouse=True)
def _empty_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with isolated_home(tmp_path_factory.mktemp("home")) as home:
        yield home


@pytest.fixture(scope="module")
def image_server(images: dict[str, Path]) -> Iterator[ImageServer]:
    srv = ImageServer({f"/{name}.png": path.read_bytes()
                       for name, path in images.items() if path.suffix == ".png"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def srv(tiny_paths: Any) -> Iterator[Running]:
    running = start_server(server_settings(tiny_paths, **{
        "images.allow_remote": True, "images.allowed_hosts": ["127.0.0.1"],
        "server.cors_origins": ["http://app.example"]}))
    yield running
    running.close()


def answer(tiny_vlm: Any, messages: list[dict[str, Any]], max_tokens: int = 8) -> str:
    return str(tiny_vlm.chat(messages, max_tokens=max_tokens).choices[0].message.content)


def test_a_developer_message_is_a_system_message(srv: Running, images: dict[str, Path],
                                                 tiny_vlm: Any) -> None:
    system = "Answer in one word."
    want = answer(tiny_vlm, [{"role": "system", "content": system},
                             *question(data_url(images["red"]))])
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TOKEN, max_retries=0)
    reply = client.chat.completions.create(
        model="default", max_tokens=8, extra_headers=FRESH,
        messages=[{"role": "developer", "content": system},
                  *question(data_url(images["red"]))])  # type: ignore[list-item]
    assert reply.choices[0].message.content == want


def test_cors_preflight_of_the_openai_js_sdk_is_allowed(srv: Running) -> None:
    asked = ("authorization, content-type, x-stainless-os, x-stainless-lang, "
             "x-stainless-package-version, x-stainless-retry-count, x-stainless-timeout")
    r = call(srv.port, "OPTIONS", CHAT, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked})
    assert r.status == 204
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"x-stainless-os", "x-stainless-retry-count", "authorization"} <= allowed
    refused = call(srv.port, "OPTIONS", CHAT, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked})
    assert refused.status == 403 and "access-control-allow-origin" not in refused.headers


def test_allow_host_by_address_covers_a_name_resolving_to_it(
        srv: Running, tiny_paths: Any, images: dict[str, Path],
        image_server: ImageServer) -> None:
    url = image_server.url("/red.png", host="localhost")  # --allow-host 127.0.0.1
    r = call(srv.port, "POST", CHAT, chat_body(url, max_tokens=2),
             headers={**srv.auth(), **FRESH})
    assert r.status == 200, r.body
    settings = server_settings(tiny_paths, **{"images.allow_remote": True,
                                              "images.allowed_hosts": ["10.1.2.3"]})
    with serving(settings) as other:
        r = call(other.port, "POST", CHAT, chat_body(url, max_tokens=2),
                 headers={**other.auth(), **FRESH})
    assert r.status == 400
    assert r.error["code"] == "image_host_not_allowed"  # not "remote_image_disabled": it is on
    assert "--allow-host localhost" in r.error["message"]


def test_stream_chunks_carry_null_finish_reason_and_logprobs(srv: Running,
                                                             images: dict[str, Path]) -> None:
    r = call(srv.port, "POST", CHAT, chat_body(data_url(images["red"]), max_tokens=4,
                                               stream=True), headers={**srv.auth(), **FRESH})
    events = [e for e in sse_events(r.body) if e != "[DONE]"]
    assert len(events) >= 3
    for event in events[:-1]:
        choice = event["choices"][0]
        assert "finish_reason" in choice and choice["finish_reason"] is None, choice
        assert "logprobs" in choice and choice["logprobs"] is None, choice
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_a_cached_answer_keeps_its_timings(srv: Running, images: dict[str, Path]) -> None:
    body = chat_body(data_url(images["green"]), max_tokens=5, seed=7)
    first = call(srv.port, "POST", CHAT, body, headers=srv.auth())
    again = call(srv.port, "POST", CHAT, body, headers=srv.auth())
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json()["timings"] == first.json()["timings"]
    assert again.json()["usage"] == first.json()["usage"]
    streamed = call(srv.port, "POST", CHAT, {**body, "stream": True}, headers=srv.auth())
    assert streamed.headers["x-cache"] == "hit"
    last = [e for e in sse_events(streamed.body) if e != "[DONE]"][-1]
    assert last["timings"] == first.json()["timings"]


def test_the_hf_text_generation_form_with_requests(srv: Running, images: dict[str, Path],
                                                   image_server: ImageServer,
                                                   tiny_vlm: Any) -> None:
    """The Inference API's raw example: ``requests.post(API_URL, headers, json=payload)``."""
    name = srv.app.models.default_spec().name
    api_url = f"{srv.url}/models/{name}"
    image = image_server.url("/blue.png")
    payload = {"inputs": f"![]({image})Describe this image in one sentence.",
               "parameters": {"max_new_tokens": 6}}
    headers = {"Authorization": f"Bearer {TOKEN}", "x-use-cache": "false",
               "x-wait-for-model": "true"}
    r = requests.post(api_url, headers=headers, json=payload, timeout=60)
    assert r.status_code == 200, r.text
    want = answer(tiny_vlm, question(data_url(images["blue"])), max_tokens=6)
    assert r.json() == [{"generated_text": want}]
    assert r.headers["x-cache"] == "miss"
    cached = requests.post(api_url, headers={"Authorization": f"Bearer {TOKEN}"},
                           json=payload, timeout=60)
    assert cached.headers["x-cache"] == "hit" and cached.json() == r.json()
    bad = requests.post(api_url, headers=headers, timeout=60,
                        json={**payload, "parameters": {"max_new_tokens": 0}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "parameters.max_new_tokens"


def test_unknown_and_ignored_fields_are_accepted_and_logged_once(
        srv: Running, images: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    body = {**chat_body(data_url(images["red"]), max_tokens=2), "user": "someone",
            "some_future_field": {"x": 1}}
    with caplog.at_level(logging.WARNING, logger="edge_vlm.server"):
        for _ in range(2):
            r = call(srv.port, "POST", CHAT, body, headers={**srv.auth(), **FRESH})
            assert r.status == 200, r.body
        wait_until(lambda: len(srv.app.records) > 0)
    messages = [rec.getMessage() for rec in caplog.records]
    unknown = [m for m in messages if "some_future_field" in m]
    ignored = [m for m in messages if "'user'" in m]
    assert len(unknown) == 1 and "unknown" in unknown[0], messages
    assert len(ignored) == 1 and "not acted on" in ignored[0], messages


def test_every_error_has_the_openai_shape_and_a_request_id(srv: Running) -> None:
    r = call(srv.port, "POST", CHAT, raw=json.dumps({"messages": []}).encode(),
             headers=srv.auth())
    assert r.status == 400 and set(r.error) == {"message", "type", "param", "code"}
    assert r.headers["x-request-id"].startswith("req-")
    record = srv.wait_record(lambda rec: rec.request_id == r.headers["x-request-id"])
    assert record.status == 400


def check_logprobs(content: list[Any], text: str, k: int) -> None:
    assert "".join(t["token"] for t in content).strip() == text.strip()
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == k
        best = t["top_logprobs"][0]
        # Greedy decoding picks the most likely token: it heads the alternatives.
        assert best["token"] == t["token"] and best["logprob"] == pytest.approx(t["logprob"])
        assert [a["logprob"] for a in t["top_logprobs"]] == sorted(
            (a["logprob"] for a in t["top_logprobs"]), reverse=True)
        assert sum(2.718281828 ** a["logprob"] for a in t["top_logprobs"]) <= 1.0 + 1e-6


def same_logprobs(a: list[Any], b: list[Any]) -> None:
    """Same tokens and alternatives; log-probabilities equal up to float noise (a prompt
    reused from the KV cache is evaluated in other batches)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["token"] == y["token"] and x["logprob"] == pytest.approx(y["logprob"], abs=0.01)
        xs = [t["token"] for t in x["top_logprobs"]]
        ys = [t["token"] for t in y["top_logprobs"]]
        # The best alternative is the chosen token; near-ties further down may swap.
        assert xs[0] == ys[0] and len(set(xs) & set(ys)) >= len(xs) - 1


def test_logprobs_and_top_logprobs_streamed_and_whole(srv: Running, images: dict[str, Path],
                                                      tiny_vlm: Any) -> None:
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TOKEN, max_retries=0)
    messages: Any = question(data_url(images["blue"]))
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
    content = [t.model_dump() for t in reply.choices[0].logprobs.content]
    assert len(content) == 6
    check_logprobs(content, text, 3)
    streamed: list[Any] = []
    for chunk in client.chat.completions.create(model="default", messages=messages,
                                                max_tokens=6, logprobs=True, top_logprobs=3,
                                                stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(t.model_dump() for t in chunk.choices[0].logprobs.content)
    same_logprobs(streamed, content)
    # The Python API returns the same.
    api = tiny_vlm.chat(messages, max_tokens=6, logprobs=True, top_logprobs=3)
    same_logprobs([t.model_dump() for t in api.choices[0].logprobs.content], content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="default", messages=messages, max_tokens=2,
                                       top_logprobs=3)


def test_responses_api_with_the_openai_sdk(srv: Running, images: dict[str, Path],
                                           tiny_vlm: Any) -> None:
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TOKEN, max_retries=0)
    system = "Answer in one word."
    want = answer(tiny_vlm, [{"role": "system", "content": system},
                             *question(data_url(images["red"]))], max_tokens=6)
    conversation: Any = [{"role": "user", "content": [
        {"type": "input_image", "image_url": data_url(images["red"])},
        {"type": "input_text", "text": "Describe this image in one sentence."}]}]
    resp = client.responses.create(model="default", instructions=system, input=conversation,
                                   max_output_tokens=6)
    assert resp.output_text == want
    assert resp.status == "incomplete" and resp.incomplete_details is not None
    assert resp.usage is not None and resp.usage.output_tokens == 6
    kinds: list[str] = []
    deltas: list[str] = []
    final: Any = None
    # The tiny model never stops by itself: the stream ends with response.incomplete
    # (max_output_tokens), as OpenAI's does; the SDK's get_final_response() wants a
    # response.completed, so the last event's response is read instead.
    with client.responses.stream(model="default", instructions=system, input=conversation,
                                 max_output_tokens=6) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.incomplete":
                final = event.response
    assert "".join(deltas) == want and final.output_text == want
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert "response.output_text.done" in kinds
    raw = client.responses.create(model="default", input="Say something.",
                                  max_output_tokens=3, stream=True)
    assert [e.type for e in raw][-1] == "response.incomplete"
    # A JSON schema through text.format.
    schema = {"type": "object", "required": ["shape"],
              "properties": {"shape": {"type": "string", "enum": ["circle", "square"]}}}
    shaped = client.responses.create(
        model="default", input=conversation, max_output_tokens=24,
        text={"format": {"type": "json_schema", "name": "scene", "schema": schema}})
    assert json.loads(shaped.output_text)["shape"] in {"circle", "square"}
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(model="default", input="hi", previous_response_id="resp_1")


def test_a_runtime_fault_is_a_500_with_a_logged_request_id(
        tiny_paths: Any, images: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    def broken_loader(spec: Any, settings: Any) -> Any:
        raise RuntimeError("the GPU caught fire")

    with caplog.at_level(logging.ERROR, logger="edge_vlm.server"), \
            serving(server_settings(tiny_paths), loader=broken_loader, ready=False) as running:
        r = call(running.port, "POST", CHAT, chat_body(data_url(images["red"]), max_tokens=2),
                 headers={**running.auth(), "x-wait-for-model": "true"})
    assert r.status == 500
    rid = r.headers["x-request-id"]
    assert rid in r.error["message"] and "failed to load" in r.error["message"]
    assert any(rid in rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR)


def test_hf_hub_offline_mode_blocks_loopback_and_the_documented_switch(
        srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the README says about ``HF_HUB_OFFLINE=1`` holds for the installed client."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    client = InferenceClient(base_url=srv.url, api_key=TOKEN)
    messages = [{"role": "user", "content": "hi"}]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
    with pytest.raises(OfflineModeIsEnabled):
        client.chat_completion(messages=messages, max_tokens=2)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the README's switch
    assert client.chat_completion(messages=messages, max_tokens=2).choices[0].message.content


def test_create_app_mounted_in_your_own_starlette_app(tiny_paths: Any, images: dict[str, Path],
                                                      tiny_vlm: Any) -> None:
    import asyncio
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from edge_vlm.server import create_app

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("my app")

    edge = create_app(server_settings(tiny_paths))  # loopback, no token: auth off
    parent = Starlette(routes=[Route("/", home), Mount("/vlm", edge)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(parent, log_config=None, lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    try:
        wait_until(lambda: server.started)
        wait_until(lambda: [m.state for m in edge.models.status()] == ["ready"])
        assert call(port, "GET", "/").body == b"my app"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/vlm/v1", api_key="x",
                               max_retries=0)
        reply = client.chat.completions.create(
            model="default", messages=question(data_url(images["red"])),  # type: ignore[arg-type]
            max_tokens=8, extra_headers=FRESH)
        assert reply.choices[0].message.content == answer(tiny_vlm,
                                                          question(data_url(images["red"])))
        assert call(port, "GET", "/vlm/health").json()["status"] == "ok"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        edge.close()
        sock.close()


def test_responses_refuses_tools_and_bad_parts_naming_the_field(srv: Running) -> None:
    for body, param in (
            ({"input": "hi", "tools": [{"type": "function", "name": "f"}]}, "tools"),
            ({"input": [{"role": "user", "content": [{"type": "input_file",
                                                      "file_id": "f1"}]}]},
             "input[0].content[0]"),
            ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
            ({}, "input")):
        r = call(srv.port, "POST", "/v1/responses", body, headers=srv.auth())
        assert r.status == 400 and r.error["param"] == param, (param, r.body)
