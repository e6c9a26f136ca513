"""Requests beyond a limit are the client's fault: 413 (RequestTooLargeError) naming the
limit and the setting, checked before the chat template runs; never a 500."""

from __future__ import annotations

from typing import Any

import pytest

import edge_vlm
from edge_vlm.config import load_settings
from edge_vlm.errors import RequestError, RequestTooLargeError
from edge_vlm.template import MAX_OUTPUT_CHARS


def test_400000_messages_are_too_many(tiny_vlm):
    msgs = [{"role": "user", "content": "hi"}] * 400_000
    with pytest.raises(RequestTooLargeError, match=r"limits\.max_messages") as info:
        tiny_vlm.chat(msgs, max_tokens=2)
    assert info.value.http_status == 413 and "400000 messages" in str(info.value)
    assert tiny_vlm.chat([{"role": "user", "content": "hi"}], max_tokens=2).choices


def test_a_message_longer_than_the_template_output_limit_is_too_large(tiny_vlm):
    text = "red " * (MAX_OUTPUT_CHARS // 4 + 10)
    with pytest.raises(RequestTooLargeError, match=r"limits\.max_text_chars") as info:
        tiny_vlm.chat([{"role": "user", "content": text}], max_tokens=2)
    assert info.value.http_status == 413
    assert str(len(text)) in str(info.value)


def test_text_within_the_limit_renders_even_past_the_old_output_bound(tiny_vlm):
    # Longer than the context, so the answer is a context error (400) — not a 500 from
    # the template's output bound.
    text = "red " * 240_000  # 960,000 characters: under limits.max_text_chars
    with pytest.raises(RequestError) as info:
        tiny_vlm.chat([{"role": "user", "content": text}], max_tokens=2)
    assert info.value.http_status == 400
    assert "context" in str(info.value)


def test_the_limits_are_settings(tiny_paths: Any, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGE_VLM_LIMITS__MAX_MESSAGES", "3")
    monkeypatch.setenv("EDGE_VLM_LIMITS__MAX_TEXT_CHARS", "10")
    settings = load_settings()
    assert settings.limits.max_messages == 3 and settings.limits.max_text_chars == 10
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=settings,
                       threads=1) as vlm:
        with pytest.raises(RequestTooLargeError, match="at most 3"):
            vlm.chat([{"role": "user", "content": "a"}] * 4, max_tokens=1)
        with pytest.raises(RequestTooLargeError, match="at most 10"):
            vlm.chat([{"role": "user", "content": "a" * 11}], max_tokens=1)
        assert vlm.chat([{"role": "user", "content": "red"}], max_tokens=1).choices


def test_deep_nesting_is_refused_before_validation(tiny_vlm):
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(RequestTooLargeError, match="nested deeper"):
        tiny_vlm.chat([{"role": "user", "content": "hi"}], max_tokens=2,
                      response_format={"type": "json", "value": {"enum": deep}})


@pytest.mark.parametrize(("ref", "needle"), [
    ("https://example.com/s.json", "never fetches"),
    ("file:///etc/passwd", "never fetches"),
    ("#", "not supported"),
    ("#/definitions/none", "points at nothing"),
])
def test_unsupported_or_remote_refs_are_400(tiny_vlm, ref, needle):
    with pytest.raises(RequestError, match=needle) as info:
        tiny_vlm.chat([{"role": "user", "content": "hi"}], max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"schema": {
                "type": "object", "properties": {"a": {"$ref": ref}}}}})
    assert info.value.http_status == 400
    assert "properties.a.$ref" in str(info.value)
