"""Request size limits checked before any template or model work (no llama_cpp here)."""

from __future__ import annotations

from edge_vlm.config import LimitSettings
from edge_vlm.errors import RequestTooLargeError
from edge_vlm.schema import ChatMessage, TextPart


def check_request_size(messages: list[ChatMessage], limits: LimitSettings) -> None:
    """Refuse a conversation with more messages or text than the settings allow.

    Raises:
        RequestTooLargeError: naming the limit and the setting that raises it.
    """
    if len(messages) > limits.max_messages:
        raise RequestTooLargeError(
            f"messages: {len(messages)} messages; at most {limits.max_messages} "
            "(setting limits.max_messages, EDGE_VLM_LIMITS__MAX_MESSAGES)", param="messages")
    total = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.text) for p in content if isinstance(p, TextPart))
    if total > limits.max_text_chars:
        raise RequestTooLargeError(
            f"messages: {total} characters of text; at most {limits.max_text_chars} "
            "(setting limits.max_text_chars, EDGE_VLM_LIMITS__MAX_TEXT_CHARS)",
            param="messages")
