"""The Hugging Face text-generation form: ``POST /models/{model}`` with
``{"inputs": "![](<image url>)Describe the image.", "parameters": {"max_new_tokens": 100}}``.

This is what ``requests.post(API_URL, json=payload)`` sends in the Inference API's
examples for vision models (TGI's form, images as Markdown). It becomes one user message
of the chat schema, images and text in their order, answered through the model's chat
template like any chat completion; the answer is ``[{"generated_text": "..."}]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from edge_vlm.schema import ChatCompletionRequest
from edge_vlm.server.errors import BadRequestError, ValidationFailedError
from edge_vlm.server.limits import parse_body

#: ``![alt](url)``; the URL may be wrapped in ``<>`` (Markdown's form for URLs with spaces).
_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?\s*\)")

#: parameter → chat-completion field, where the meaning is the same.
_SAME = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
         "top_k": "top_k", "seed": "seed", "stop": "stop",
         "repetition_penalty": "repeat_penalty", "frequency_penalty": "frequency_penalty"}
#: Parameters accepted and not acted on (logged once each).
_IGNORED = {"details": "token details are not returned",
            "decoder_input_details": "token details are not returned",
            "truncate": "inputs are never truncated; too long is a 400",
            "typical_p": "typical sampling is not supported",
            "watermark": "no watermarking", "best_of": "one answer per request",
            "top_n_tokens": "token details are not returned",
            "adapter_id": "no adapters", "use_cache": "send the x-use-cache header",
            "wait_for_model": "send the x-wait-for-model header"}


def parse_inputs(inputs: str) -> list[dict[str, Any]]:
    """Split ``inputs`` into content parts: Markdown images and the text around them."""
    parts: list[dict[str, Any]] = []
    pos = 0
    for m in _IMAGE.finditer(inputs):
        if inputs[pos:m.start()].strip():
            parts.append({"type": "text", "text": inputs[pos:m.start()]})
        parts.append({"type": "image_url", "image_url": {"url": m.group(1)}})
        pos = m.end()
    if inputs[pos:].strip() or not parts:
        parts.append({"type": "text", "text": inputs[pos:]})
    return parts


def to_chat_request(body: Any, model: str,
                    note: Callable[[str, str], None]) -> tuple[ChatCompletionRequest, bool]:
    """The chat request a text-generation body means, and its ``return_full_text``.

    Args:
        body: The parsed JSON body.
        model: The model named in the path.
        note: Logs a field once (``ServerApp.note_field``).

    Raises:
        BadRequestError: not ``{"inputs": str, "parameters": {...}}``, or ``stream``.
        ValidationFailedError: a parameter is invalid, naming it.
    """
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
        raise BadRequestError(
            "this endpoint takes the Hugging Face text-generation form "
            '{"inputs": "![](<image url>)question", "parameters": {"max_new_tokens": N}}; '
            "for chat messages POST to /models/{model}/v1/chat/completions", param="inputs")
    if body.get("stream"):
        raise BadRequestError("stream: the text-generation form is answered whole here; "
                              "stream through /v1/chat/completions", param="stream")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequestError("parameters: must be a JSON object", param="parameters")
    data: dict[str, Any] = {"messages": [{"role": "user",
                                          "content": parse_inputs(body["inputs"])}]}
    for name, value in params.items():
        if name in _SAME:
            data[_SAME[name]] = value
        elif name in _IGNORED:
            note(f"text-generation:{name}", f"text-generation parameter {name!r} is accepted "
                 f"but not acted on: {_IGNORED[name]}")
        elif name not in ("do_sample", "return_full_text", "grammar"):
            note(f"text-generation:{name}",
                 f"text-generation parameter {name!r} is unknown to this server and ignored")
    if "do_sample" in params and "temperature" not in params:
        data["temperature"] = 1.0 if params["do_sample"] else 0.0
    grammar = params.get("grammar")
    if isinstance(grammar, dict) and grammar.get("type") == "json":
        data["response_format"] = {"type": "json", "value": grammar.get("value")}
    elif grammar is not None:
        raise BadRequestError("parameters.grammar: only {\"type\": \"json\", \"value\": "
                              "<JSON schema>} is supported", param="parameters.grammar")
    try:
        request = parse_body(data, model)
    except ValidationFailedError as err:
        param = err.param or ""
        renamed = {v: f"parameters.{k}" for k, v in _SAME.items()}
        if param in renamed:
            raise ValidationFailedError(err.message.replace(param, renamed[param], 1),
                                        param=renamed[param]) from None
        raise
    return request, bool(params.get("return_full_text", False))
