"""The core runtime through the public Python API, on real GGUF files and real llama.cpp."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import edge_vlm
from edge_vlm.errors import ContextOverflowError, ModelMismatchError
from tests.conftest import ask


def answer(vlm, messages, **kw) -> str:  # type: ignore[no-untyped-def]
    return vlm.chat(messages, max_tokens=kw.pop("max_tokens", 12), temperature=0, **kw) \
        .choices[0].message.content


def test_different_images_give_different_greedy_answers(tiny_vlm, images):
    a = answer(tiny_vlm, ask(images["red"]))
    b = answer(tiny_vlm, ask(images["blue"]))
    assert a and b
    assert a != b, "the answer did not depend on the image: pixels never reached the model"


def test_same_image_and_seed_give_the_same_answer(tiny_vlm, images):
    first = tiny_vlm.chat(ask(images["green"]), max_tokens=12, temperature=0.9, seed=7)
    tiny_vlm.chat(ask(images["red"]), max_tokens=4)  # something else in between
    again = tiny_vlm.chat(ask(images["green"]), max_tokens=12, temperature=0.9, seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content


def test_usage_counts_image_tokens(tiny_vlm, images):
    reply = tiny_vlm.chat(ask(images["red"]), max_tokens=5, temperature=0)
    chunks = tiny_vlm.debug_prompt_chunks(ask(images["red"]))
    image_tokens = sum(n for kind, n in chunks if kind == "image")
    text_tokens = sum(len(n) for kind, n in chunks if kind == "text")
    assert image_tokens == 16  # 64 px / patch 16 = 4 x 4
    assert reply.usage.prompt_tokens == image_tokens + text_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.timings.image_tokens == 16


def test_two_images_in_one_message_are_both_seen(tiny_vlm, images):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(images["red"])}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": str(images["blue"])}},
        {"type": "text", "text": "What is this?"}]}]
    reply = tiny_vlm.chat(messages, max_tokens=4, temperature=0)
    assert reply.timings.image_tokens == 32
    assert len(reply.timings.images) == 2
    kinds = [k for k, _ in tiny_vlm.debug_prompt_chunks(messages)]
    assert kinds == ["text", "image", "text", "image", "text"]


def test_streaming_equals_non_streaming(tiny_vlm, images):
    whole = tiny_vlm.chat(ask(images["blue"]), max_tokens=14, temperature=0)
    chunks = list(tiny_vlm.chat(ask(images["blue"]), stream=True, max_tokens=14, temperature=0))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.timings is not None and last.timings.completion_tokens == 14
    assert last.timings.ttft_ms > 0 and last.timings.decode_tps > 0


def test_include_usage_adds_a_usage_chunk(tiny_vlm, images):
    chunks = list(tiny_vlm.chat(ask(images["red"]), stream=True, max_tokens=3,
                                stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_max_tokens_gives_length(tiny_vlm, images):
    reply = tiny_vlm.chat(ask(images["red"]), max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_string_is_never_emitted(tiny_vlm, images):
    full = answer(tiny_vlm, ask(images["red"]), max_tokens=16)
    words = full.split()
    stop = words[2]  # a word that appears after the start of the answer
    cut = full.index(stop, len(words[0]) + 1)
    reply = tiny_vlm.chat(ask(images["red"]), max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:cut]
    assert stop not in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"


def test_context_overflow_is_reported_before_evaluation(tiny_vlm, images):
    tiny_vlm.chat(ask(images["red"]), max_tokens=2)
    with pytest.raises(ContextOverflowError) as err:
        tiny_vlm.chat(ask(images["blue"]), max_tokens=5000)
    msg = str(err.value)
    assert "5000" in msg and str(tiny_vlm.engine.backend.n_ctx) in msg and "max_tokens" in msg
    # Nothing was evaluated: the KV cache still holds the previous conversation.
    again = tiny_vlm.chat(ask(images["red"]), max_tokens=2)
    assert again.timings.prompt_tokens_reused == again.timings.prompt_tokens - 1


def test_json_schema_response_format(tiny_vlm, images):
    schema = {"type": "object", "properties": {"shape": {"type": "string", "enum": ["circle",
              "square"]}, "count": {"type": "integer"}}, "required": ["shape", "count"]}
    reply = tiny_vlm.chat(ask(images["red"]), max_tokens=48, temperature=0,
                          response_format={"type": "json_schema",
                                           "json_schema": {"name": "x", "schema": schema}})
    data = json.loads(reply.choices[0].message.content)
    assert data["shape"] in {"circle", "square"} and isinstance(data["count"], int)


def test_cancel_stops_within_a_token_and_model_stays_usable(tiny_vlm, images):
    cancel = threading.Event()
    got = []
    for chunk in tiny_vlm.chat(ask(images["red"]), stream=True, max_tokens=200,
                               temperature=0, cancel=cancel):
        got.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            cancel.set()
    last = got[-1]
    assert last.choices[0].finish_reason == "cancelled"
    assert last.timings.completion_tokens <= 2
    reply = tiny_vlm.chat(ask(images["red"]), max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5


def test_concurrent_callers_queue_and_get_correct_answers(tiny_vlm, images):
    expected = {k: answer(tiny_vlm, ask(images[k])) for k in ("red", "blue", "green")}
    results: dict[str, list[str]] = {k: [] for k in expected}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            for _ in range(2):
                results[key].append(answer(tiny_vlm, ask(images[key])))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in expected for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for key, got in results.items():
        assert got == [expected[key]] * 4


def test_mismatched_mmproj_is_refused_with_both_widths(tiny_paths, mismatched_mmproj):
    with pytest.raises(ModelMismatchError) as err:
        edge_vlm.load(tiny_paths.model, mismatched_mmproj)
    msg = str(err.value)
    assert "512" in msg and "256" in msg
    assert mismatched_mmproj.name in msg and tiny_paths.model.name in msg


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_load_close_twenty_times_does_not_leak(tiny_paths, images):
    def cycle() -> None:
        with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, threads=1) as vlm:
            vlm.chat(ask(images["red"]), max_tokens=2)

    for _ in range(3):
        cycle()
    before = _rss_mb()
    for _ in range(20):
        cycle()
    growth = _rss_mb() - before
    # A leaked model+context+mtmd per cycle would be >= 3 MB each, 60+ MB in all.
    assert growth < 25, f"RSS grew {growth:.1f} MB over 20 load/close cycles"
