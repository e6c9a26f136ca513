"""Tool calling: each family's template shows the tools, each family's calls are read back,
and a tiny model with a tool template answers tool calls through the API and the server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edge_vlm.schema import parse_request
from edge_vlm.template import ChatTemplate
from edge_vlm.tools import ToolSetup, detect_format, split_tool_calls, tool_setup
from tests.server_support import (
    TOKEN,
    Running,
    call,
    data_url,
    isolated_home,
    question,
    server_settings,
    start_server,
)

_BODY = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|user|>RESULT {{ message.content }}<|end|>"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|assistant|>"
    "{%- for c in message.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}<|end|>"
    "{%- else %}<|{{ message.role }}|>{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for p in message.content %}{{ p.text }}{% endfor %}{% endif %}<|end|>"
    "{%- endif %}{%- endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
#: Trimmed-down templates of each family: how they present tools and how calls look.
TEMPLATES = {
    "hermes": "{%- if tools %}<|system|>Tools: <tools>{% for t in tools %}{{ t | tojson }}"
              "{% endfor %}</tools> Call one as <tool_call>{\"name\": ..., \"arguments\": ...}"
              "</tool_call><|end|>{% endif %}" + _BODY,
    "llama3": "{%- if tools %}<|system|>Environment: ipython. Respond with <|python_tag|>"
              "{\"name\": ..., \"parameters\": ...} using {% for t in tools %}{{ t | tojson }}"
              "{% endfor %}<|end|>{% endif %}" + _BODY,
    "mistral": "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]"
               "{% endif %}" + _BODY + "{# calls come as [TOOL_CALLS] #}",
    "gemma": "{%- if tools %}<|system|>Write ```tool_code\\nname(arg=value)\\n``` to call "
             "{% for t in tools %}{{ t.function.name }} {% endfor %}<|end|>{% endif %}" + _BODY,
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                  "unit": {"type": "string", "enum": ["C", "F"]}}}}}
SHAPE = {"type": "function", "function": {
    "name": "name_shape", "parameters": {
        "type": "object", "required": ["shape"], "additionalProperties": False,
        "properties": {"shape": {"type": "string", "enum": ["circle", "square"]}}}}}


def setup(fmt: str) -> ToolSetup:
    req = parse_request({"messages": [{"role": "user", "content": "hi"}],
                         "tools": [WEATHER, SHAPE]})
    found = tool_setup(req, TEMPLATES[fmt], "m")
    assert found is not None and found.fmt == fmt
    return found


def test_each_family_is_recognised_by_its_template() -> None:
    for fmt, source in TEMPLATES.items():
        assert detect_format(source) == fmt
    from edge_vlm.testing.templates import GENERIC

    assert detect_format(GENERIC) is None


@pytest.mark.parametrize("fmt,text", [
    ("hermes", 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "unit": "C"}}\n</tool_call>\n<tool_call>{"name": "name_shape",'
               ' "arguments": {"shape": "circle"}}</tool_call>'),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
               '"unit": "C"}}; {"name": "name_shape", "parameters": {"shape": "circle"}}'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
                '"unit": "C"}}, {"name": "name_shape", "arguments": {"shape": "circle"}}]'),
    ("gemma", 'Sure.\n```tool_code\nget_weather(city="Paris", unit="C")\n'
              'name_shape(shape="circle")\n```'),
])
def test_each_familys_calls_are_read(fmt: str, text: str) -> None:
    content, calls = split_tool_calls(text, setup(fmt))
    assert [c.function.name for c in calls] == ["get_weather", "name_shape"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "C"}
    assert json.loads(calls[1].function.arguments) == {"shape": "circle"}
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert content in (None, "Let me look.", "Sure.")


def test_mistral_named_form_and_text_that_is_not_a_call() -> None:
    content, calls = split_tool_calls(
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "unit": "F"}', setup("mistral"))
    assert content is None and calls[0].function.name == "get_weather"
    for fmt in TEMPLATES:
        text = "It is a red circle. <tool_call>not json</tool_call>"
        assert split_tool_calls(text, setup(fmt)) == (text, [])
    # A call to a function that was not offered is text, not a call.
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert split_tool_calls(unknown, setup("hermes")) == (unknown, [])


def test_templates_show_the_tools_and_the_returned_results() -> None:
    messages = parse_request({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                     {"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}).messages
    for source in TEMPLATES.values():
        text = ChatTemplate(source).render(messages, "<__media__>", tools=[WEATHER])
        assert "get_weather" in text and "<__media__>" in text
        assert "RESULT sunny" in text and 'CALL get_weather {"city": "Paris"}' in text


def test_a_required_call_needs_tools_and_a_template_that_has_them() -> None:
    req = parse_request({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                         "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    with pytest.raises(Exception, match="'nope' is not in 'tools'"):
        tool_setup(req, TEMPLATES["hermes"], "m")
    plain = parse_request({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]})
    with pytest.raises(Exception, match="has no tool support") as err:
        tool_setup(plain, "{{ messages }}", "m")
    assert getattr(err.value, "param", None) == "tools"


# --- end to end: a tiny model with a Hermes-style template -----------------------------------


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from edge_vlm.testing import variant, write_pair

    return write_pair(variant("generic", chat_template=TEMPLATES["hermes"]),
                      tmp_path_factory.mktemp("toolmodel"), prefix="tools-")


@pytest.fixture(scope="module")
def tool_srv(tool_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with isolated_home(tmp_path_factory.mktemp("home")):
        running = start_server(server_settings(tool_model))
        yield running
        running.close()


def test_the_python_api_returns_a_required_call(tool_model: Any, images: dict[str, Path]) -> None:
    import edge_vlm

    with edge_vlm.load(str(tool_model.model), str(tool_model.mmproj), threads=2) as vlm:
        reply = vlm.chat(question(data_url(images["red"]), "What shape?"), max_tokens=300,
                         tools=[WEATHER, SHAPE], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    called = choice.message.tool_calls[0].function
    assert called.name in ("get_weather", "name_shape")
    args = json.loads(called.arguments)
    assert args in ({"shape": "circle"}, {"shape": "square"}) or args["city"] in ("Paris", "Oslo")


def test_openai_sdk_tools_with_images_named_required_and_results(
        tool_srv: Running, images: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=f"{tool_srv.url}/v1", api_key=TOKEN, max_retries=0)
    messages: Any = question(data_url(images["red"]), "What shape is this?")
    reply = client.chat.completions.create(
        model="default", messages=messages, max_tokens=300, tools=[WEATHER, SHAPE],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "name_shape"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    tool_call = choice.message.tool_calls[0]
    assert tool_call.function.name == "name_shape"  # type: ignore[union-attr]
    assert json.loads(tool_call.function.arguments)["shape"] in ("circle", "square")  # type: ignore[union-attr]
    # Streamed: the call arrives as a tool_calls delta.
    deltas: list[Any] = []
    finish = None
    for chunk in client.chat.completions.create(
            model="default", messages=messages, max_tokens=300, tools=[WEATHER, SHAPE],  # type: ignore[list-item]
            tool_choice="required", stream=True):
        if chunk.choices:
            deltas.extend(chunk.choices[0].delta.tool_calls or [])
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and deltas and deltas[0].function.name in ("get_weather",
                                                                             "name_shape")
    # The result goes back as a tool message, with the image still in the conversation.
    follow = client.chat.completions.create(
        model="default", max_tokens=4, tools=[WEATHER, SHAPE],  # type: ignore[list-item]
        messages=[*messages, choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
                  {"role": "tool", "tool_call_id": tool_call.id, "content": "circle"}],
        tool_choice="none")
    assert follow.choices[0].finish_reason == "length" and follow.choices[0].message.content


def test_tools_for_a_model_without_tool_support_is_a_400(tiny_paths: Any,
                                                         images: dict[str, Path],
                                                         tmp_path: Path) -> None:
    with isolated_home(tmp_path):
        running = start_server(server_settings(tiny_paths))
        try:
            r = call(running.port, "POST", "/v1/chat/completions", {
                "messages": question(data_url(images["red"])), "max_tokens": 4,
                "tools": [WEATHER]}, headers=running.auth())
        finally:
            running.close()
    assert r.status == 400 and r.error["param"] == "tools"
    assert "no tool support" in r.error["message"]
