"""Tool calling: offering functions to a model and reading its calls back.

The tools go to the model through its own chat template (Hugging Face templates take a
``tools`` variable); a template that never mentions ``tools`` cannot show them, and a
request with tools for such a model is refused naming the field. What the model writes
back depends on its family, and is read here into OpenAI's ``tool_calls``:

- Qwen / Hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated;
- Llama 3: ``<|python_tag|>{"name": ..., "parameters": {...}}`` (or the bare JSON);
- Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]`` or
  ``[TOOL_CALLS]name[ARGS]{...}``;
- Gemma: a ```` ```tool_code ```` block holding ``name(key=value, ...)``.

When a call is required (``tool_choice: "required"`` or a named function) the answer is
constrained by a grammar to one JSON call ``{"name": ..., "arguments": {...}}``, whatever
the family. The Python API and the server both use this module.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from edge_vlm.errors import RequestError
from edge_vlm.schema import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall

ToolFormat = Literal["hermes", "llama3", "mistral", "gemma", "json"]


def detect_format(template_source: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches its model, None without tool support."""
    src = template_source or ""
    if "tools" not in src:
        return None
    if "<tool_call>" in src:
        return "hermes"
    if "[TOOL_CALLS]" in src:
        return "mistral"
    if "<|python_tag|>" in src or "ipython" in src:
        return "llama3"
    if "tool_code" in src:
        return "gemma"
    return "json"


@dataclass(frozen=True)
class ToolSetup:
    """How one request's tools are offered and read back.

    Attributes:
        fmt: The family's call format.
        tools: The tool list given to the chat template.
        schema: A JSON schema constraining the answer to one call (required or named
            choice), else None.
        names: The offered functions' names.
    """

    fmt: ToolFormat
    tools: list[dict[str, Any]]
    schema: dict[str, Any] | None
    names: frozenset[str]


def tool_setup(request: ChatCompletionRequest, template_source: str | None,
               model: str) -> ToolSetup | None:
    """The tool setup of a request, None when it offers no tools (or ``tool_choice: none``).

    Raises:
        RequestError: the model's template has no tool support, a named function is not
            among the tools, or a call is required together with a JSON response format.
    """
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice: a tool is required but 'tools' is empty",
                               param="tool_choice")
        return None
    if choice == "none":
        return None
    fmt = detect_format(template_source)
    if fmt is None:
        raise RequestError(
            f"tools: the chat template of model {model!r} has no tool support (it never "
            "uses a 'tools' variable), so the model cannot be shown them; send the request "
            "without 'tools', or use a model whose template supports tools", param="tools")
    offered = [t.model_dump(exclude_none=True) for t in request.tools]
    names = frozenset(t.function.name for t in request.tools)
    schema = None
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        fmt_obj = request.response_format
        if fmt_obj is not None and fmt_obj.type != "text":
            raise RequestError("response_format: cannot be combined with a required tool "
                               "call (tool_choice); the call's arguments follow its schema",
                               param="response_format")
        wanted = [t for t in request.tools
                  if choice == "required" or (not isinstance(choice, str)
                                              and t.function.name == choice.name)]
        if not wanted:
            raise RequestError(f"tool_choice: function {choice.name!r} is not in 'tools' "  # type: ignore[union-attr]
                               f"({', '.join(sorted(names))})", param="tool_choice")
        options = [{"type": "object", "required": ["name", "arguments"],
                    "additionalProperties": False,
                    "properties": {"name": {"const": t.function.name},
                                   "arguments": t.function.parameters or {"type": "object"}}}
                   for t in wanted]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
    return ToolSetup(fmt, offered, schema, names)


def new_call_id() -> str:
    """A fresh ``call_...`` id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: Any, arguments: Any) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        text = arguments
    else:
        text = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=text))


def _from_json_obj(obj: Any) -> list[ToolCall]:
    """Calls from decoded JSON: a call, a list of calls, or ``{"tool_calls": [...]}``."""
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
        obj = obj["tool_calls"]
    items = obj if isinstance(obj, list) else [obj]
    calls: list[ToolCall] = []
    for item in items:
        if not isinstance(item, dict):
            return []
        inner = item.get("function")
        fn: dict[str, Any] = inner if isinstance(inner, dict) else item
        call = _call(fn.get("name"), fn.get("arguments", fn.get("parameters")))
        if call is None:
            return []
        calls.append(call)
    return calls


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in ``text`` (separated by whitespace or ``;``), None if not all JSON."""
    decoder = json.JSONDecoder()
    out: list[Any] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(value)
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return out


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_ARGS = re.compile(r"\[TOOL_CALLS\]\s*([\w.-]+)\s*\[ARGS\]\s*", re.DOTALL)
_GEMMA = re.compile(r"```tool_code\s*(.*?)\s*```", re.DOTALL)


def split_tool_calls(text: str, setup: ToolSetup) -> tuple[str | None, list[ToolCall]]:
    """Split a model's answer into its text and its tool calls.

    Returns:
        The text left (None when the answer was only calls) and the calls, which name
        only offered functions; an answer that is not a well-formed call is all text.
    """
    calls: list[ToolCall] = []
    rest = text
    if setup.schema is not None or setup.fmt == "json":
        values = _json_values(text)
        calls = [c for v in values or [] for c in _from_json_obj(v)]
        rest = "" if calls else text
    elif setup.fmt == "hermes":
        for m in _HERMES.finditer(text):
            found = _json_values(m.group(1))
            calls += [c for v in found or [] for c in _from_json_obj(v)]
        if calls:
            rest = _HERMES.sub("", text)
    elif setup.fmt == "mistral" and "[TOOL_CALLS]" in text:
        head, _, tail = text.partition("[TOOL_CALLS]")
        named = _MISTRAL_ARGS.match("[TOOL_CALLS]" + tail)
        if named:
            values = _json_values(tail[named.end() - len("[TOOL_CALLS]"):].split("[TOOL_CALLS]")[0])
            if values:
                call = _call(named.group(1), values[0])
                calls = [call] if call else []
        else:
            calls = [c for v in _json_values(tail) or [] for c in _from_json_obj(v)]
        rest = head if calls else text
    elif setup.fmt == "llama3":
        body = text.split("<|python_tag|>", 1)[1] if "<|python_tag|>" in text else text
        calls = [c for v in _json_values(body) or [] for c in _from_json_obj(v)]
        rest = text.split("<|python_tag|>", 1)[0] if calls else text
    elif setup.fmt == "gemma":
        for m in _GEMMA.finditer(text):
            calls += _python_calls(m.group(1))
        if calls:
            rest = _GEMMA.sub("", text)
    calls = [c for c in calls if c.function.name in setup.names]
    if not calls:
        return text, []
    rest = rest.strip()
    return (rest or None), calls


def _python_calls(code: str) -> list[ToolCall]:
    """``name(key=value, ...)`` lines (Gemma's tool_code), literal arguments only."""
    try:
        tree = ast.parse(code, mode="exec")
    except SyntaxError:
        return []
    calls: list[ToolCall] = []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            return []
        node = stmt.value
        name = ast.unparse(node.func)
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError:
            return []
        call = _call(name, args)
        if call is not None:
            calls.append(call)
    return calls


def template_tool_fields(message: ChatMessage) -> dict[str, Any]:
    """A message's tool fields as chat templates read them (arguments as objects)."""
    out: dict[str, Any] = {}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
