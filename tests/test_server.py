"""`edge-vlm serve` through real clients: huggingface_hub's InferenceClient and the OpenAI SDK.

A real server on 127.0.0.1 (ephemeral port, in a thread) loads a real GGUF pair through
llama.cpp. With the tiny random-weight model, "correct" means the answer the Python API
gives for the same request; with the shipped model (once it is in models/shapes-vlm) it
means the world's canonical answer about the image.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from edge_vlm.resolve import SHIPPED_MMPROJ_FILE, SHIPPED_MODEL_FILE, shipped_model_dir
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
    sse_events,
    start_server,
    wait_until,
)


@pytest.fixture(scope="module", autouse=True)
def _empty_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with isolated_home(tmp_path_factory.mktemp("home")) as home:
        yield home


N = 16  # tokens per answer: the tiny model never stops by itself


@pytest.fixture(scope="module")
def image_server(images: dict[str, Path]) -> Iterator[ImageServer]:
    srv = ImageServer({f"/{name}.png": path.read_bytes()
                       for name, path in images.items() if path.suffix == ".png"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def srv(tiny_paths: Any) -> Iterator[Running]:
    settings = server_settings(tiny_paths, **{"images.allow_remote": True,
                                              "images.allowed_hosts": ["127.0.0.1"]})
    running = start_server(settings)
    yield running
    running.close()


def expected(tiny_vlm: Any, image: Path, max_tokens: int = N) -> str:
    """The Python API's greedy answer to the seed question about ``image``."""
    reply = tiny_vlm.chat(question(data_url(image)), max_tokens=max_tokens)
    return str(reply.choices[0].message.content)


def test_hf_inference_client_runs_the_seed_snippet(srv: Running, images: dict[str, Path],
                                                   image_server: ImageServer,
                                                   tiny_vlm: Any) -> None:
    want = expected(tiny_vlm, images["red"])
    client = InferenceClient(base_url=srv.url, api_key=TOKEN)
    fresh = InferenceClient(base_url=srv.url, api_key=TOKEN, headers={"x-use-cache": "false"})
    for url in (data_url(images["red"]), image_server.url("/red.png")):
        messages = question(url)
        output = fresh.chat_completion(messages=messages, max_tokens=N, stream=True)
        streamed = [chunk.choices[0].delta.content for chunk in output]
        assert "".join(s or "" for s in streamed) == want
        assert len([s for s in streamed if s]) > 1, "the answer came in one piece: not streamed"
        whole = client.chat_completion(messages=messages, max_tokens=N)
        assert whole.choices[0].message.content == want
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == N
    assert "/red.png" in image_server.requests


def test_openai_sdk_streaming_plain_and_usage(srv: Running, images: dict[str, Path],
                                              tiny_vlm: Any) -> None:
    want = expected(tiny_vlm, images["blue"])
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TOKEN, max_retries=0)
    messages: Any = question(data_url(images["blue"]))
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=N,
                                           extra_headers={"x-use-cache": "false"})
    assert reply.choices[0].message.content == want
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.usage is not None and reply.usage.completion_tokens == N
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=N,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_headers={"x-use-cache": "false"})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_response_format_json_schema_from_both_clients(srv: Running,
                                                       images: dict[str, Path]) -> None:
    schema = {"type": "object", "required": ["shape", "count"],
              "properties": {"shape": {"type": "string", "enum": ["circle", "square"]},
                             "count": {"type": "integer"}}}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "scene", "schema": schema}}
    messages: Any = question(data_url(images["green"]))
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TOKEN, max_retries=0)
    hf = InferenceClient(base_url=srv.url, api_key=TOKEN)
    answers = [
        oa.chat.completions.create(model="default", messages=messages, max_tokens=48,
                                   response_format=fmt).choices[0].message.content,
        # The HF client rewrites json_schema to TGI's {"type": "json_object", "value": ...}.
        hf.chat_completion(messages=messages, max_tokens=48,
                           response_format=fmt).choices[0].message.content,
    ]
    for text in answers:
        data = json.loads(text or "")
        assert data["shape"] in {"circle", "square"} and isinstance(data["count"], int)


def test_hub_url_layout_takes_the_model_from_the_path(srv: Running, images: dict[str, Path],
                                                      tiny_vlm: Any) -> None:
    name = srv.app.models.default_spec().name
    client = InferenceClient(base_url=f"{srv.url}/models/{name}", api_key=TOKEN)
    reply = client.chat_completion(messages=question(data_url(images["red"])), max_tokens=N)
    assert reply.choices[0].message.content == expected(tiny_vlm, images["red"])
    missing = "HuggingFaceTB/SmolVLM-256M-Instruct"
    r = call(srv.port, "POST", f"/models/{missing}/v1/chat/completions",
             chat_body(data_url(images["red"])), headers=srv.auth())
    assert r.status == 404
    assert r.error["type"] == "not_found_error"
    # The catalog knows that hub id: the message says how to get it.
    assert "edge-vlm models pull smolvlm-256m" in r.error["message"]
    with pytest.raises(HfHubHTTPError) as err:
        InferenceClient(base_url=f"{srv.url}/models/{missing}", api_key=TOKEN).chat_completion(
            messages=question(data_url(images["red"])), max_tokens=2)
    assert "not installed" in str(err.value)
    unknown = call(srv.port, "POST", "/v1/chat/completions",
                   {**chat_body(data_url(images["red"])), "model": "someone/unknown-vlm"},
                   headers=srv.auth())
    assert unknown.status == 404 and "edge-vlm models import" in unknown.error["message"]


def test_store_models_answer_by_name_and_by_hub_id(tiny_paths: Any, images: dict[str, Path],
                                                  tiny_vlm: Any, _empty_store: Path) -> None:
    from edge_vlm.store.importer import import_pair
    from edge_vlm.store.store import Store

    # The tiny model installed under the catalog's name for SmolVLM-256M-Instruct.
    import_pair(Store.default(), tiny_paths.model, tiny_paths.mmproj, name="smolvlm-256m",
                check_load=False)
    assert Store.default().root.is_relative_to(_empty_store)
    running = start_server(server_settings(tiny_paths))  # the default model loaded
    default = running.app.models.default_spec().name
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=TOKEN, max_retries=0)
        listed = {m.id: m.model_dump() for m in client.models.list().data}
        assert listed["smolvlm-256m"]["loaded"] is False and listed[default]["loaded"] is True
        for model in ("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct",
                      "ggml-org/SmolVLM-256M-Instruct-GGUF"):
            reply = client.chat.completions.create(
                model=model, messages=question(data_url(images["red"])),  # type: ignore[arg-type]
                max_tokens=N, extra_headers={"x-wait-for-model": "true"})
            assert reply.model == "smolvlm-256m"
            assert reply.choices[0].message.content == expected(tiny_vlm, images["red"])
        listed = {m.id: m.model_dump() for m in client.models.list().data}
        assert listed["smolvlm-256m"]["loaded"] is True
        # One resident model (server.max_loaded_models = 1): the idle default made room.
        assert listed[default]["loaded"] is False
    finally:
        running.close()


MIRROR_CATALOG = """[models.in-mirror]
title = "A mirrored model"
repo = "example/in-mirror-GGUF"
license = "apache-2.0"
parameters = "256M"
context = 8192
layers = 30
kv_heads = 3
head_dim = 64
default = "Q8_0"
quants = { Q8_0 = { file = "in-mirror-Q8_0.gguf", size_mb = 175 } }
mmproj = { file = "mmproj-in-mirror.gguf", size_mb = 104 }
"""


def test_model_names_follow_the_catalog_file_of_the_servers_settings(tmp_path: Path) -> None:
    from edge_vlm.errors import ModelNotFoundError
    from edge_vlm.server.models import ModelManager

    extra = tmp_path / "mirror.toml"
    extra.write_text(MIRROR_CATALOG)
    models = ModelManager(server_settings(None, **{"store.catalog_file": str(extra)}))
    # By store name and by the hub id of its upstream: a 404 saying how to pull it.
    for name in ("in-mirror", "example/in-mirror"):
        with pytest.raises(ModelNotFoundError, match="models pull in-mirror"):
            models.resolve(name)
    without = ModelManager(server_settings(None))  # the same server without that catalog
    with pytest.raises(ModelNotFoundError, match="not in the model catalog"):
        without.resolve("example/in-mirror")


def test_models_list_marks_the_loaded_model_and_health_is_open(srv: Running) -> None:
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TOKEN, max_retries=0)
    models = client.models.list().data
    name = srv.app.models.default_spec().name
    assert models[0].id == name
    first = models[0].model_dump()
    assert first["loaded"] is True and first["object"] == "model"
    health = call(srv.port, "GET", "/health")  # no token needed
    assert health.status == 200 and health.json()["status"] == "ok"
    assert call(srv.port, "GET", "/v1/models").status == 401


def test_x_use_cache_hits_bypasses_and_replays_as_a_stream(srv: Running,
                                                           images: dict[str, Path],
                                                           image_server: ImageServer) -> None:
    body = chat_body(data_url(images["blue"]), max_tokens=7)
    first = call(srv.port, "POST", "/v1/chat/completions", body,
                 headers={**srv.auth(), "x-use-cache": "false"})
    again = call(srv.port, "POST", "/v1/chat/completions", body, headers=srv.auth())
    assert (first.status, again.status) == (200, 200)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    text = first.json()["choices"][0]["message"]["content"]
    assert again.json()["choices"][0]["message"]["content"] == text
    assert again.json()["id"] != first.json()["id"]
    # The same image fetched from a URL has the same content identity: still a hit.
    by_url = chat_body(image_server.url("/blue.png"), max_tokens=7, stream=True)
    streamed = call(srv.port, "POST", "/v1/chat/completions", by_url, headers=srv.auth())
    assert streamed.headers["x-cache"] == "hit"
    events = sse_events(streamed.body)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "")
                   for e in events[:-1] if e["choices"]) == text
    bypass = call(srv.port, "POST", "/v1/chat/completions", body,
                  headers={**srv.auth(), "x-use-cache": "false"})
    assert bypass.headers["x-cache"] == "miss"
    assert bypass.json()["timings"]["completion_tokens"] == 7  # really computed


def test_only_deterministic_requests_are_cached(srv: Running, images: dict[str, Path]) -> None:
    sampled = chat_body(data_url(images["red"]), max_tokens=5, temperature=0.9)
    seeded = {**sampled, "seed": 42}
    for body, second in ((sampled, "miss"), (seeded, "hit")):
        call(srv.port, "POST", "/v1/chat/completions", body, headers=srv.auth())
        r = call(srv.port, "POST", "/v1/chat/completions", body, headers=srv.auth())
        assert r.headers["x-cache"] == second


def test_one_log_line_per_request(srv: Running, images: dict[str, Path],
                                  caplog: pytest.LogCaptureFixture) -> None:
    name = srv.app.models.default_spec().name
    path = f"/models/{name}/v1/chat/completions"  # no other test uses it

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if path in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="edge_vlm.server"):
        reply = call(srv.port, "POST", path, chat_body(data_url(images["red"]), max_tokens=3),
                     headers={**srv.auth(), "x-use-cache": "false"})
        wait_until(lambda: bool(lines()))  # logged once the response went out
        time.sleep(0.2)
    assert len(lines()) == 1
    line = lines()[0]
    for part in (f"POST {path} 200", f"model={name}", "completion_tokens=3",
                 "prompt_tokens=", "ttft=", "total=", "cache=miss",
                 "images=auto/1t/"):  # the image's detail, tiles and tokens
        assert part in line, line
    # The logged TTFT is the engine's, the one the response's timings report.
    engine_ttft = json.loads(reply.body)["timings"]["ttft_ms"]
    assert engine_ttft > 0 and f"ttft={engine_ttft:.0f}ms" in line, line


# --- the shipped model: answers must be right -------------------------------------------

SHIPPED = shipped_model_dir()
needs_shipped = pytest.mark.skipif(
    not ((SHIPPED / SHIPPED_MODEL_FILE).is_file() and (SHIPPED / SHIPPED_MMPROJ_FILE).is_file()),
    reason=f"the shipped model is not in {SHIPPED} yet (issue 3): the answer-correctness "
           "checks need its trained weights")


@pytest.fixture(scope="module")
def shipped() -> Iterator[tuple[Running, Any]]:
    from shapes_vlm import world

    rng = random.Random(7)
    while True:  # an easy scene: one large shape on a plain background
        scene = world.sample_scene(rng, n_shapes=1, size=(320, 240))
        if scene.background.kind == "plain" and scene.shapes[0].size > 0.35:
            break
    running = start_server(server_settings(None, **{"images.allow_remote": True,
                                                    "images.allowed_hosts": ["127.0.0.1"]}))
    yield running, scene
    running.close()


@needs_shipped
def test_shipped_model_answers_the_seed_snippet_correctly(shipped: tuple[Running, Any],
                                                          tmp_path: Path) -> None:
    from shapes_vlm import render, world

    running, scene = shipped
    path = tmp_path / "scene.png"
    render.render(scene).save(path)
    images = ImageServer({"/scene.png": path.read_bytes()}).start()
    try:
        client = InferenceClient(base_url=running.url, api_key=TOKEN)
        for url in (data_url(path), images.url("/scene.png")):
            output = client.chat_completion(
                model="default",
                messages=question(url, "Describe this image in one sentence."),
                max_tokens=500, stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in output)
            assert text.strip() == world.describe(scene)
            reply = client.chat_completion(
                messages=question(url, "What shape is in the image?"), max_tokens=500)
            assert (reply.choices[0].message.content or "").strip() == world.answer(scene, "shape")
    finally:
        images.stop()


@needs_shipped
@pytest.mark.xfail(strict=True, reason="shapes-vlm never saw JSON in training: under the schema's "
                   "grammar it writes valid JSON of its world's words, but not the right ones "
                   "(a limit in its model card)")
def test_shipped_model_fills_a_json_schema_correctly(shipped: tuple[Running, Any],
                                                     tmp_path: Path) -> None:
    from shapes_vlm import render, world

    running, scene = shipped
    path = tmp_path / "scene.png"
    render.render(scene).save(path)
    schema = {"type": "object", "required": ["shape", "color"], "properties": {
        "shape": {"type": "string", "enum": list(world.SHAPES)},
        "color": {"type": "string", "enum": list(world.COLORS)}}}
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=TOKEN, max_retries=0)
    messages: Any = question(data_url(path), "What shape is in the image?")
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "shape", "schema": schema}}
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=64,
                                           response_format=fmt)
    data = json.loads(reply.choices[0].message.content or "")
    assert (data["shape"], data["color"]) == (scene.shapes[0].kind, scene.shapes[0].color)
