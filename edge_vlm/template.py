"""Render a model's chat template safely.

Chat templates come from GGUF files, and GGUF files come from strangers: a template is
untrusted code. CVE-2024-34359 was remote code execution through exactly this, and a
template can also try to hang or exhaust memory. So templates render in Jinja's immutable
sandbox, with ``range`` sizes, string/list multiplication, output size and render time
bounded; a template that trips a bound raises :class:`~edge_vlm.errors.ModelLoadError`.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_vlm.errors import ModelLoadError, RequestError
from edge_vlm.schema import ChatMessage, ImagePart, TextPart

#: Used when a GGUF carries no ``tokenizer.chat_template`` (documented in the README).
GENERIC_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message.role }}|>\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}{{ part.text }}{% endfor %}{% endif %}"
    "<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MAX_OUTPUT_CHARS = 2_000_000
MAX_RENDER_SECONDS = 2.0
MAX_RANGE = 100_000
MAX_SEQUENCE = 1_000_000


class _TemplateLimitError(Exception):
    pass


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus bounds on arithmetic blow-ups and render time."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.Undefined,
            extensions=["jinja2.ext.loopcontrols"],
        )
        self.deadline = float("inf")
        self.globals["range"] = self._range

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimitError(f"rendering took longer than {MAX_RENDER_SECONDS:.0f} s")

    def _range(self, *args: int) -> range:
        self.check_time()
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _TemplateLimitError(f"range of {len(r)} items exceeds {MAX_RANGE}")
        return r

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        self.check_time()
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise _TemplateLimitError("exponent too large")
            return operator.pow(left, right)
        # "*": bound sequence repetition
        for seq, count in ((left, right), (right, left)):
            if (isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                    and len(seq) * count > MAX_SEQUENCE):
                raise _TemplateLimitError("sequence repetition too large")
        return operator.mul(left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        self.check_time()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.check_time()
        return super().getattr(obj, attribute)


def _raise_exception(message: str) -> None:
    raise RequestError(f"the model's chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    """A compiled, sandboxed chat template.

    Args:
        source: The Jinja source (from ``tokenizer.chat_template``), or None for the
            generic fallback.
        bos_token: Text of the BOS token (passed to the template as ``bos_token``).
        eos_token: Text of the EOS token.
    """

    source: str | None
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        self.is_fallback = not self.source
        self._env = _BoundedEnvironment()
        try:
            self._template = self._env.from_string(self.source or GENERIC_TEMPLATE)
        except jinja2.TemplateSyntaxError as err:
            raise ModelLoadError(
                f"the model's chat template has a syntax error at line {err.lineno}: "
                f"{err.message}"
            ) from None
        self.typed_content = self._probe_typed_content()

    def _probe_typed_content(self) -> bool:
        """Whether the template prints list content part by part (else give it strings)."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "PROBE\u2063"}]}]
        try:
            out = self._render_raw(probe, add_generation_prompt=False)
        except Exception:  # a template that cannot take lists at all
            return False
        return "PROBE\u2063" in out and "'type'" not in out

    def _render_raw(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None = None) -> str:
        self._env.deadline = time.monotonic() + MAX_RENDER_SECONDS
        pieces: list[str] = []
        size = 0
        gen = self._template.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            tools=tools,
        )
        for piece in gen:
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise _TemplateLimitError(f"output exceeds {MAX_OUTPUT_CHARS} characters")
            self._env.check_time()
            pieces.append(piece)
        return "".join(pieces)

    def render(
        self,
        messages: list[ChatMessage],
        marker: str,
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render a conversation, each image part becoming ``marker`` where it appears.

        ``tools`` (OpenAI's tool list) goes to the template's ``tools`` variable, and
        messages keep their ``tool_calls`` and ``tool_call_id`` (see :mod:`edge_vlm.tools`).

        Raises:
            RequestError: the template refused the conversation (``raise_exception``).
            ModelLoadError: the template broke a sandbox bound or failed.
        """
        payload = [self._message_payload(m, marker) for m in messages]
        if tools is not None or any(m.tool_calls or m.tool_call_id for m in messages):
            from edge_vlm.tools import template_tool_fields

            for item, m in zip(payload, messages, strict=True):
                item.update(template_tool_fields(m))
        try:
            return self._render_raw(payload, add_generation_prompt, tools)
        except RequestError:
            raise
        except _TemplateLimitError as err:
            raise ModelLoadError(f"the model's chat template was stopped: {err}") from None
        except jinja2.exceptions.SecurityError as err:
            raise ModelLoadError(f"the model's chat template tried an unsafe operation: {err}") \
                from None
        except Exception as err:
            raise ModelLoadError(
                f"the model's chat template failed to render: {type(err).__name__}: {err}"
            ) from None

    def _message_payload(self, message: ChatMessage, marker: str) -> dict[str, Any]:
        content = message.content
        if content is None or isinstance(content, str):
            return {"role": message.role, "content": content or ""}
        parts: list[dict[str, str]] = []
        for part in content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                # As llama.cpp's server does: the image becomes the media marker, as text.
                parts.append({"type": "text", "text": marker})
        if self.typed_content:
            return {"role": message.role, "content": parts}
        return {"role": message.role, "content": "".join(p["text"] for p in parts)}

