"""The server's request limits and the validation of a request body.

Body size and JSON depth are checked while reading (:mod:`.body`); bytes and pixels
per image by the image loader (:mod:`edge_vlm.images`); this module checks what the parsed
request asks for: how many images, how many tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Protocol

from edge_vlm.config import ServerSettings
from edge_vlm.errors import RequestError
from edge_vlm.schema import ChatCompletionRequest, ImagePart, parse_request
from edge_vlm.server.errors import BadRequestError, ValidationFailedError, validation_error


def parse_body(body: Any, model_from_path: str | None) -> ChatCompletionRequest:
    """Validate a chat-completion body (the model in the URL path wins over ``model``).

    Raises:
        BadRequestError: the body is not a JSON object.
        ValidationFailedError: a field is invalid, naming it.
    """
    if not isinstance(body, dict):
        raise BadRequestError(
            f"the request body must be a JSON object, not a JSON {_json_kind(body)}")
    data = normalize_client_quirks(body)
    if model_from_path is not None:
        data["model"] = model_from_path
    try:
        return parse_request(data)
    except RequestError as err:
        raise validation_error(err) from None


def normalize_client_quirks(body: dict[str, Any]) -> dict[str, Any]:
    """Undo what a client does to a standard request on its way here.

    ``huggingface_hub.InferenceClient`` turns OpenAI's ``{"type": "json_schema",
    "json_schema": {"schema": S}}`` into ``{"type": "json_object", "value": S}`` (TGI's
    form); the schema is still meant, so it becomes ``{"type": "json", "value": S}``.
    """
    data = dict(body)
    fmt = data.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object" and fmt.get("value"):
        data["response_format"] = {"type": "json", "value": fmt["value"]}
    return data


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def check_limits(request: ChatCompletionRequest, limits: ServerSettings) -> None:
    """Refuse a request over the server's limits, naming the field.

    Raises:
        ValidationFailedError: too many images or too many tokens asked for.
    """
    count = 0
    for i, msg in enumerate(request.messages):
        if not isinstance(msg.content, list):
            continue
        for j, part in enumerate(msg.content):
            if isinstance(part, ImagePart):
                count += 1
                if count > limits.max_images_per_request:
                    field = f"messages[{i}].content[{j}]"
                    raise ValidationFailedError(
                        f"{field}: the request holds more than "
                        f"{limits.max_images_per_request} images "
                        "(server.max_images_per_request); send fewer images per request",
                        param=field)
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name)
        if value is not None and value > limits.max_tokens_limit:
            raise ValidationFailedError(
                f"{name}: {value} is over this server's limit of {limits.max_tokens_limit} "
                "(server.max_tokens_limit); ask for fewer tokens", param=name)


#: Fields OpenAI and HF clients send that edge-vlm accepts and does not act on (the README
#: lists them); each is logged once.
NOT_ACTED_ON = {
    "user": "identifies the end user to OpenAI; nothing to do locally",
    "store": "OpenAI stores completions; this server keeps nothing",
    "metadata": "stored with a completion by OpenAI; this server keeps nothing",
    "service_tier": "OpenAI's processing tier; there is one here",
    "logit_bias": "not supported by this server's sampler",
    "parallel_tool_calls": "a required or named call is one call; otherwise every call the "
                           "model writes is returned",
    "reasoning_effort": "for reasoning models",
    "modalities": "text output only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "no web search offline",
    "tool_prompt": "HF's tool prompt; the model's chat template renders tools",
}


class _Noter(Protocol):
    def note_field(self, name: str, message: str) -> None: ...


def note_fields(app: _Noter, body: Any, known: Iterable[str] | None = None,
                where: str = "chat.completions") -> None:
    """Log, once per field name, a request field this server does not know or ignores.

    Unknown fields are accepted (OpenAI and HF clients send extras) but never silently.
    """
    if not isinstance(body, dict):
        return
    names = set(known) if known is not None else _chat_fields()
    for name in body:
        if name in NOT_ACTED_ON:
            app.note_field(f"{where}:{name}", f"request field {name!r} ({where}) is accepted "
                           f"but not acted on: {NOT_ACTED_ON[name]}")
        elif name not in names:
            app.note_field(f"{where}:{name}", f"request field {name!r} ({where}) is unknown "
                           "to this server and ignored")


@functools.cache
def _chat_fields() -> frozenset[str]:
    fields = ChatCompletionRequest.model_fields
    return frozenset({*fields, *(f.alias for f in fields.values() if f.alias)})

