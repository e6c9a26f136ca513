"""``POST /v1/responses``: OpenAI's Responses API on top of the chat-completion schema.

Stateless: a request carries the whole conversation (``input`` as a string, or a list of
messages with ``input_text``/``input_image`` parts), ``instructions`` becomes the system
message, ``max_output_tokens`` the token limit, ``text.format`` the response format.
Nothing is stored, so ``previous_response_id`` is refused with a 400 saying so. The
answer is a ``response`` object, or with ``stream`` the Responses event stream
(``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from edge_vlm.errors import EdgeVLMError
from edge_vlm.schema import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Usage
from edge_vlm.server.errors import BadRequestError, ValidationFailedError, error_body
from edge_vlm.server.limits import parse_body
from edge_vlm.stats import usage

#: Request fields this endpoint reads (others are logged once, see ``limits.note_fields``).
KNOWN_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "stream", "text", "temperature",
    "top_p", "previous_response_id", "seed", "top_logprobs",
})

_ROLES = ("user", "system", "developer", "assistant")


def to_chat_request(body: Any) -> ChatCompletionRequest:
    """The chat request a Responses body means.

    Raises:
        BadRequestError: the body is not a Responses request, or asks for stored state.
        ValidationFailedError: a field is invalid, naming it.
    """
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    for name in ("tools", "tool_choice"):
        if body.get(name):
            raise BadRequestError(
                f"{name}: tools are not supported on /v1/responses here; use "
                "/v1/chat/completions, which supports them", param=name)
    if body.get("previous_response_id"):
        raise BadRequestError(
            "previous_response_id: this server stores no responses (it is stateless); send "
            "the whole conversation in 'input' instead", param="previous_response_id")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequestError("instructions: must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        messages.extend(_message(item, f"input[{i}]") for i, item in enumerate(raw))
    else:
        raise BadRequestError("input: required, a string or a non-empty list of messages",
                              param="input")
    data: dict[str, Any] = {"messages": messages, "stream": bool(body.get("stream", False))}
    for src, dst in (("model", "model"), ("max_output_tokens", "max_tokens"),
                     ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if body.get(src) is not None:
            data[dst] = body[src]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        data["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "response"), "schema": fmt.get("schema") or {},
            "strict": fmt.get("strict")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        data["response_format"] = {"type": "json_object"}
    elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise BadRequestError("text.format: must be {\"type\": \"text\"}, "
                              "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                              "\"schema\": ...}", param="text.format")
    try:
        return parse_body(data, None)
    except ValidationFailedError as err:
        if err.param == "max_tokens":
            raise ValidationFailedError(err.message.replace("max_tokens", "max_output_tokens"),
                                        param="max_output_tokens") from None
        raise


def _message(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict) or item.get("type", "message") != "message" \
            or item.get("role") not in _ROLES:
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        raise BadRequestError(
            f"{where}: only messages (role user, system, developer or assistant) are "
            f"supported here, not {kind!r}", param=where)
    content = item.get("content")
    if isinstance(content, str):
        return {"role": item["role"], "content": content}
    if not isinstance(content, list):
        raise BadRequestError(f"{where}.content: must be a string or a list of parts",
                              param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise BadRequestError(
                    f"{where}.content[{j}].image_url: required (a data: or http(s) URL; "
                    "file_id needs OpenAI's file store)", param=f"{where}.content[{j}].image_url")
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise BadRequestError(f"{where}.content[{j}]: part type {kind!r} is not supported "
                                  "(input_text, input_image, output_text)",
                                  param=f"{where}.content[{j}]")
    return {"role": item["role"], "content": parts}


# -- the answer ---------------------------------------------------------------------------


def _usage(u: Usage) -> dict[str, Any]:
    # The counts are the engine's (edge_vlm.stats.usage); the Responses API only names
    # them differently and adds its detail blocks.
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": u.total_tokens}


def _envelope(rid: str, created: float, model: str, body: dict[str, Any],
              status: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "model": model, "output": [], "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "text": body.get("text") or {"format": {"type": "text"}},
        "previous_response_id": None, "metadata": body.get("metadata") or {},
        "usage": None,
    }


def _message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _finish(out: dict[str, Any], finish: str | None, mid: str, text: str,
            counts: Usage) -> dict[str, Any]:
    complete = finish != "length"
    out["status"] = "completed" if complete else "incomplete"
    if not complete:
        out["incomplete_details"] = {"reason": "max_output_tokens"}
    out["output"] = [_message_item(mid, text, "completed" if complete else "incomplete")]
    out["usage"] = _usage(counts)
    return out


def response_object(reply: ChatCompletion, body: dict[str, Any]) -> dict[str, Any]:
    """A whole answer as a ``response`` object."""
    out = _envelope(f"resp_{uuid.uuid4().hex}", float(reply.created), reply.model, body,
                    "completed")
    return _finish(out, reply.choices[0].finish_reason, f"msg_{uuid.uuid4().hex}",
                   reply.choices[0].message.content or "", reply.usage)


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, ensure_ascii=False,
                      separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def events(items: AsyncIterator[ChatCompletionChunk | EdgeVLMError],
                 body: dict[str, Any]) -> AsyncIterator[bytes]:
    """The Responses event stream of a streamed answer."""
    rid, mid, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", time.time()
    seq = 0
    out: dict[str, Any] | None = None
    text: list[str] = []
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    async for item in items:
        if isinstance(item, EdgeVLMError):
            err = error_body(item)["error"]
            yield _event("error", seq, code=err["code"], message=err["message"],
                         param=err["param"], error=err)
            return
        if out is None:
            out = _envelope(rid, created, item.model, body, "in_progress")
            yield _event("response.created", seq, response=out)
            yield _event("response.in_progress", seq + 1, response=out)
            yield _event("response.output_item.added", seq + 2, output_index=0,
                         item={**_message_item(mid, "", "in_progress"), "content": []})
            yield _event("response.content_part.added", seq + 3, **where,
                         part={"type": "output_text", "text": "", "annotations": []})
            seq += 4
        choice = item.choices[0] if item.choices else None
        if choice is None:
            continue
        if choice.delta.content:
            text.append(choice.delta.content)
            yield _event("response.output_text.delta", seq, **where,
                         delta=choice.delta.content, logprobs=[])
            seq += 1
        if choice.finish_reason is not None:
            whole = "".join(text)
            stats = item.timings
            done = _finish(dict(out), choice.finish_reason, mid, whole,
                           usage(stats) if stats else Usage())
            part = {"type": "output_text", "text": whole, "annotations": []}
            yield _event("response.output_text.done", seq, **where, text=whole, logprobs=[])
            yield _event("response.content_part.done", seq + 1, **where, part=part)
            yield _event("response.output_item.done", seq + 2, output_index=0,
                         item=done["output"][0])
            final = "response.completed" if done["status"] == "completed" \
                else "response.incomplete"
            yield _event(final, seq + 3, response=done)
            seq += 4
