"""response_format schemas that used to kill the process (llama.cpp's grammar parser
overflowing its stack, or aborting on a token no rule allows) are refused, naming the part
of the schema; the bounds themselves are checked against llama.cpp in a child process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from edge_vlm.errors import RequestError, RequestTooLargeError
from edge_vlm.grammar import (
    MAX_ENUM,
    MAX_GRAMMAR_NESTING,
    MAX_REPETITION,
    MAX_SCHEMA_DEPTH,
    grammar_nesting,
)

ASK = [{"role": "user", "content": "red square"}]
FIELD = "response_format.json_schema.schema"


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def string_prop(**bounds: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"type": "string", **bounds}}}


def nested(depth: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


REFUSED = [
    # (schema, the part named, the error class)
    (string_prop(maxLength=30_000), f"{FIELD}.properties.name.maxLength", RequestError),
    (string_prop(minLength=10**9), f"{FIELD}.properties.name.minLength", RequestError),
    (string_prop(maxLength=-1), f"{FIELD}.properties.name.maxLength", RequestError),
    ({"type": "string", "pattern": "^a{0,30000}$"}, f"{FIELD}.pattern", RequestError),
    ({"type": "string", "pattern": "^(a{2,99999})$"}, f"{FIELD}.pattern", RequestError),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 30_000},
     f"{FIELD}.maxItems", RequestError),
    ({"type": "object", "maxProperties": 10**6}, f"{FIELD}.maxProperties", RequestError),
    ({"enum": [f"v{i}" for i in range(MAX_ENUM + 1)]}, f"{FIELD}.enum", RequestTooLargeError),
    (nested(MAX_SCHEMA_DEPTH + 2), FIELD, RequestTooLargeError),
    ({"type": "integer", "minimum": 10**40}, f"{FIELD}.minimum", RequestError),
    ({"type": "number", "maximum": float("nan")}, FIELD, RequestError),
    ({"$ref": "https://example.com/schema.json"}, f"{FIELD}.$ref", RequestError),
    ({"$ref": "other.json#/x"}, f"{FIELD}.$ref", RequestError),
    ({"$ref": "#/$defs/missing"}, f"{FIELD}.$ref", RequestError),
    ({"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}}, FIELD, RequestError),
    ({"type": "string", "pattern": "(?=lookahead)x"}, FIELD, RequestError),
    ({"type": "object", "properties": {"a": 5}}, f"{FIELD}.properties.a", RequestError),
]


@pytest.mark.parametrize(("schema", "part", "kind"), REFUSED,
                         ids=[p.removeprefix(FIELD) or "schema" for _, p, _ in REFUSED])
def test_a_schema_the_runtime_cannot_serve_is_refused_naming_its_part(
        tiny_vlm, schema, part, kind):
    with pytest.raises(kind) as info:
        tiny_vlm.chat(ASK, max_tokens=4, response_format=fmt(schema))
    assert part in str(info.value), str(info.value)
    assert info.value.http_status in {400, 413}
    # The process lives and the next request answers.
    assert tiny_vlm.chat(ASK, max_tokens=2).usage.completion_tokens >= 1


def test_the_hf_form_names_its_own_field(tiny_vlm):
    with pytest.raises(RequestError, match=r"response_format\.value\.properties\.name"):
        tiny_vlm.chat(ASK, max_tokens=4,
                      response_format={"type": "json", "value": string_prop(maxLength=10**6)})


def test_a_pattern_no_token_can_satisfy_is_an_error_not_an_abort(tiny_vlm):
    # An empty character range: llama.cpp's chain would pick a forbidden token and abort
    # the process when the grammar accepted it.
    with pytest.raises(RequestError, match="allows no text"):
        tiny_vlm.chat(ASK, max_tokens=4, response_format=fmt(
            {"type": "string", "pattern": "^[b-a]$"}))
    assert tiny_vlm.chat(ASK, max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("sampled", [False, True])
def test_schemas_at_the_bounds_still_constrain_the_answer(tiny_vlm, sampled):
    import json

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": MAX_REPETITION},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 50}},
        "required": ["name", "tags"]}
    extra = {"temperature": 0.9, "seed": 1} if sampled else {}
    reply = tiny_vlm.chat(ASK, max_tokens=200, response_format=fmt(schema), **extra)
    text = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        data = json.loads(text)
        assert set(data) == {"name", "tags"}
    else:
        assert text.lstrip().startswith("{")


def test_grammar_nesting_counts_groups_outside_literals():
    assert grammar_nesting('root ::= ("(" ([a-z(] x)?)?') == 2
    assert grammar_nesting('root ::= "((((" # ((((\n') == 0


# llama.cpp's parser recurses once per nested group; these run in a child process so that a
# crash is a failed test, not a dead test run.
_CHILD = textwrap.dedent("""
    import sys, threading
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    import json
    stack_kb, n = int(sys.argv[1]), int(sys.argv[2])
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": n},
              "a": {"type": "array", "items": {"type": "integer"}, "maxItems": n},
              "p": {"type": "string", "pattern": "^x{0,%d}$" % n}}}
    g = json_schema_to_gbnf(json.dumps(schema))
    threading.stack_size(stack_kb * 1024)
    result = []
    def run():
        s = llama_cpp.llama_sampler_init_grammar(None, g.encode(), b"root")
        result.append(bool(s))
    t = threading.Thread(target=run); t.start(); t.join()
    print("parsed" if result[0] else "refused")
""")


def test_the_repetition_bound_survives_a_512_kib_thread_stack():
    proc = subprocess.run([sys.executable, "-c", _CHILD, "512", str(MAX_REPETITION)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() in {"parsed", "refused"}
    assert MAX_GRAMMAR_NESTING <= MAX_REPETITION
