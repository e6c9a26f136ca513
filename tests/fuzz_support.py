"""Hypothesis strategies for hostile chat-completion requests (shared by the fuzz tests).

Requests are drawn field by field from :class:`~edge_vlm.schema.ChatCompletionRequest`:
fields with a known meaning get values around and beyond their bounds, any other field
(one added later) gets arbitrary JSON. Text mixes ordinary words, lone surrogates, the chat
template's control tokens and libmtmd's media marker.

The number of examples is ``EDGE_VLM_FUZZ_EXAMPLES`` (per test; CI runs the default).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edge_vlm.schema import ChatCompletionRequest


def examples(default: int) -> int:
    """Examples per test: ``EDGE_VLM_FUZZ_EXAMPLES`` or ``default``."""
    return int(os.environ.get("EDGE_VLM_FUZZ_EXAMPLES", default))


def fuzz_settings(default: int) -> Any:
    return settings(max_examples=examples(default), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)


HOSTILE_WORDS = ["<|end|>", "<|assistant|>", "<|user|>", "<|system|>", "<s>", "</s>",
                 "<unk>", "<__media__>", "{{ x }}", "{% raise %}", "\ue000", "\x00",
                 "\u202e", "red", "square", "circle", " ", "\n", "é🙂"]

_plain = st.one_of(
    st.lists(st.sampled_from(HOSTILE_WORDS), max_size=12).map("".join),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
)
texts = st.one_of(
    _plain, _plain, _plain, _plain,
    st.text(alphabet=st.characters(categories=("Cs", "L")), min_size=1, max_size=10),
)

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 0.5, 1.1, -2.0, 2.0, 10, 100, 101, 2**31, 2**63]),
)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def _deep(depth: int) -> Any:
    value: Any = {"type": "integer"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"a": value}}
    return value


counts = st.one_of(st.integers(min_value=-5, max_value=40),
                   st.sampled_from([999, 1000, 1001, 30_000, 10**9, -(10**9)]))

schemas: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("string")}, optional={
            "maxLength": counts, "minLength": counts,
            "pattern": st.one_of(texts, st.sampled_from([
                "^a{0,30000}$", "^[b-a]$", "^(a|b){2,5}$", "^x{3}$", "(?=a)b", "^\\d+$"]))}),
        st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])}, optional={
            "minimum": numbers, "maximum": numbers}),
        st.fixed_dictionaries({"enum": st.lists(json_values, min_size=0, max_size=6)}),
        st.fixed_dictionaries({"$ref": st.sampled_from([
            "https://example.com/s.json", "#/$defs/x", "#", "file:///etc/passwd", "#/a"])}),
        st.sampled_from([{"type": "boolean"}, {"type": "null"}, {}, _deep(40),
                         {"enum": list(range(5000))}]),
        json_values,
    ),
    lambda inner: st.one_of(
        st.fixed_dictionaries({"type": st.just("object"),
                               "properties": st.dictionaries(texts, inner, max_size=3)},
                              optional={"required": st.lists(texts, max_size=3)}),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                              optional={"maxItems": counts, "minItems": counts}),
        st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)}),
    ),
    max_leaves=6,
)

response_formats = st.one_of(
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"name": st.just("x"),
                                                                 "schema": schemas})}),
    st.fixed_dictionaries({"type": st.sampled_from(["json", "json_object"]), "value": schemas}),
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_schema", "yaml", 5])}),
    json_values,
)


def content(image_urls: list[str]) -> st.SearchStrategy[Any]:
    image = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": st.sampled_from(
            image_urls * 4 + ["/nonexistent.png", "data:image/png;base64,AAAA", "",
                              "x" * 300])},
            optional={"detail": st.sampled_from(["low", "high", "auto", "max", 3])}),
        st.fixed_dictionaries({"url": st.sampled_from(image_urls or [""])}),
        json_values)})
    text = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
    parts = st.lists(st.one_of(text, text, image), min_size=1, max_size=4)
    return st.one_of(texts, texts, parts, parts, parts, st.none(), json_values)


def messages(image_urls: list[str]) -> st.SearchStrategy[Any]:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user"] * 12 + ["system"] * 3 + ["assistant"] * 3
                                 + ["tool", "", 7]),
         "content": content(image_urls)},
        optional={"name": texts})
    good = st.lists(message, min_size=1, max_size=4)
    return st.one_of(good, good, good, good, good, good, json_values)


def _sane(strategy: st.SearchStrategy[Any], *valid: Any) -> st.SearchStrategy[Any]:
    """Mostly ordinary values, sometimes a hostile one."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), strategy)


KNOWN: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.sampled_from([1, 3, 4, 4, 4, -1, 0, 10**7, 2**63, 2.5, "3"]),
    "max_completion_tokens": st.sampled_from([2, 2, -1, 0, 10**9]),
    "temperature": _sane(numbers, 0, 0.7, 1.5),
    "top_p": _sane(numbers, 0.9, 1.0, 0.0),
    "top_k": _sane(numbers, 0, 1, 40),
    "min_p": _sane(numbers, 0.0, 0.05),
    "seed": _sane(numbers, 0, 1, 2**40),
    "frequency_penalty": _sane(numbers, 0.5, -1.0, 2.0),
    "presence_penalty": _sane(numbers, 0.3, -2.0),
    "repeat_penalty": _sane(numbers, 1.1, 1.0, 0.5),
    "logit_bias": st.one_of(st.dictionaries(st.integers(0, 700).map(str),
                                            st.floats(-100, 100), max_size=4),
                            st.dictionaries(st.one_of(texts, st.integers(-3, 10**6).map(str)),
                                            numbers, max_size=4), json_values),
    "stop": st.one_of(st.lists(st.sampled_from(["red", "\n", "<|end|>", "square"]),
                               min_size=1, max_size=3),
                      texts, st.lists(texts, max_size=20), json_values),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                json_values),
    "response_format": response_formats,
    "n": st.sampled_from([None, 1, 1, 0, 2, -1]),
}


@st.composite
def _request(draw: Any, image_urls: list[str]) -> dict[str, Any]:
    fields = [n for n in ChatCompletionRequest.model_fields if n not in {"messages", "model"}]
    chosen = draw(st.lists(st.sampled_from([*fields, "unknown_field"]), max_size=4,
                           unique=True))
    request: dict[str, Any] = {"messages": draw(messages(image_urls))}
    for name in chosen:
        request[name] = draw(KNOWN.get(name, json_values))
    return request


def requests(image_urls: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Whole request dicts: ``messages`` and up to four other fields of the schema (a field
    added to the schema later is drawn as arbitrary JSON)."""
    return _request(image_urls)
