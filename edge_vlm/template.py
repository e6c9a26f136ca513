"""Render a model's chat template safely.

Chat templates come from GGUF files, and GGUF files come from strangers: a template is
untrusted code. CVE-2024-34359 was remote code execution through exactly this, and a
template can also try to hang or exhaust memory. So templates render in Jinja's immutable
sandbox, with ``range`` sizes, string/list multiplication, output size and render time
bounded; a template that trips a bound raises :class:`~edge_vlm.errors.ModelLoadError`.
"""

from __future__ import annotations

import functools
import operator
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_vlm.errors import ModelLoadError, RequestError
from edge_vlm.prompt import PieceKind, PromptPiece, RenderedPrompt
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
"""Output allowed beyond twice the conversation's own text."""
MAX_RENDER_SECONDS = 2.0
MAX_RANGE = 100_000
MAX_SEQUENCE = 1_000_000
"""Largest string or list a template may build, beyond twice the conversation's text."""
MAX_INT_BITS = 65_536
"""Largest integer a template may compute (``**`` and ``*`` towers), in bits."""

# A printf width or precision that is ``*`` or 7+ digits; a str.format field holding 7+ digits.
_PERCENT_WIDTH = re.compile(r"%[-+ #0]*(?:\*|\d{7,})|%[-+ #0]*\d*\.(?:\*|\d{7,})")
_FORMAT_WIDTH = re.compile(r"\{[^{}]*\d{7,}[^{}]*\}")


class _TemplateLimitError(Exception):
    pass


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus bounds on arithmetic, string and list blow-ups and render
    time: every operator, call, filter and attribute read a template can use to grow a
    value is checked before (where the size can be told) and after it runs."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.Undefined,
            extensions=["jinja2.ext.loopcontrols"],
        )
        self.deadline = float("inf")
        self.size_limit = MAX_SEQUENCE
        self.globals["range"] = self._range
        # lorem ipsum of any size, for free: no chat template needs it.
        self.globals.pop("lipsum", None)
        self.filters = {name: self._bounded_filter(f) for name, f in self.filters.items()}

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimitError(f"rendering took longer than {MAX_RENDER_SECONDS:.0f} s")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.size_limit:
            raise _TemplateLimitError(
                f"a value of {len(value)} items exceeds {self.size_limit}")
        if isinstance(value, int) and not isinstance(value, bool) \
                and value.bit_length() > MAX_INT_BITS:
            raise _TemplateLimitError(f"an integer of more than {MAX_INT_BITS} bits")
        return value

    def check_args(self, args: Any, kwargs: dict[str, Any]) -> None:
        for arg in (*args, *kwargs.values()):
            self.check_size(arg)
            # A width, count or padding this large can only be an attack (center, ljust,
            # zfill, indent, wordwrap, expandtabs...): refuse before Python allocates it.
            if isinstance(arg, int) and not isinstance(arg, bool) \
                    and abs(arg) > self.size_limit:
                raise _TemplateLimitError(f"argument {arg} is too large")

    def check_replace(self, text: Any, old: Any, new: Any) -> None:
        """Refuse a replacement whose result could exceed the size limit."""
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            worst = (len(text) + 1) * len(new) if not old else \
                len(text) // max(1, len(old)) * len(new) + len(text)
            if worst > self.size_limit:
                raise _TemplateLimitError("a replacement could grow the text too large")

    def _bounded_filter(self, func: Any) -> Any:
        @functools.wraps(func)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.check_time()
            self.check_args(args, kwargs)
            texts = [a for a in args if isinstance(a, str)]
            if getattr(func, "__name__", "") == "do_replace" and len(texts) >= 3:
                self.check_replace(*texts[-3:])
            return self.check_size(func(*args, **kwargs))

        return bounded

    def _range(self, *args: int) -> range:
        self.check_time()
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _TemplateLimitError(f"range of {len(r)} items exceeds {MAX_RANGE}")
        return r

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        self.check_time()
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise _TemplateLimitError("exponent too large")
            if ints and right > 0 and left.bit_length() * right > MAX_INT_BITS:
                raise _TemplateLimitError(f"an integer of more than {MAX_INT_BITS} bits")
            return operator.pow(left, right)
        if operator_ == "%":
            if isinstance(left, str) and _PERCENT_WIDTH.search(left):
                raise _TemplateLimitError("a format width or precision too large")
            return self.check_size(operator.mod(left, right))
        if operator_ == "+":
            if hasattr(left, "__len__") and hasattr(right, "__len__") \
                    and len(left) + len(right) > self.size_limit:
                raise _TemplateLimitError("concatenation too large")
            return operator.add(left, right)
        # "*": bound sequence repetition and integer growth
        for seq, count in ((left, right), (right, left)):
            if (isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                    and len(seq) * count > self.size_limit):
                raise _TemplateLimitError("sequence repetition too large")
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _TemplateLimitError(f"an integer of more than {MAX_INT_BITS} bits")
        return operator.mul(left, right)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        if _FORMAT_WIDTH.search(value.__self__):
            raise _TemplateLimitError("a format width or precision too large")

        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.check_args(args, kwargs)
            return self.check_size(wrapped(*args, **kwargs))

        return bounded

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        self.check_time()
        self.check_args(args, kwargs)
        if getattr(__obj, "__name__", "") == "replace" and isinstance(
                getattr(__obj, "__self__", None), str) and len(args) >= 2:
            self.check_replace(__obj.__self__, args[0], args[1])
        return self.check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.check_time()
        return self.check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.check_time()
        return self.check_size(super().getitem(obj, argument))


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
        check_in_child: Before first use, render a probe conversation in a child process
            under hard memory and CPU limits (:mod:`edge_vlm.sandbox`), so that a template
            that hangs or exhausts memory past the in-process bounds is refused at load
            instead of taking the process down. Done once per template per process.

    Raises:
        ModelLoadError: the template does not compile or fails the child-process check.
    """

    source: str | None
    bos_token: str = ""
    eos_token: str = ""
    check_in_child: bool = True

    def __post_init__(self) -> None:
        self.is_fallback = not self.source
        self._lock = threading.Lock()
        if self.source and self.check_in_child:
            from edge_vlm.sandbox import check_template

            check_template(self.source, self.bos_token, self.eos_token)
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
                    input_chars: int = 0, tools: list[dict[str, Any]] | None = None) -> str:
        # The bounds live on the environment: one render at a time sets and reads them.
        with self._lock:
            return self._render_locked(messages, add_generation_prompt, input_chars, tools)

    def _render_locked(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                       input_chars: int, tools: list[dict[str, Any]] | None) -> str:
        env = self._env
        env.deadline = time.monotonic() + MAX_RENDER_SECONDS
        # The conversation's own text may be large; what the template adds may not.
        env.size_limit = MAX_SEQUENCE + 2 * input_chars
        limit = MAX_OUTPUT_CHARS + 2 * input_chars
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
            if size > limit:
                raise _TemplateLimitError(f"output exceeds {limit} characters")
            env.check_time()
            pieces.append(piece)
        return "".join(pieces)

    def _render_payload(self, payload: list[dict[str, Any]], add_generation_prompt: bool,
                        input_chars: int, tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return self._render_raw(payload, add_generation_prompt, input_chars, tools)
        except RequestError:
            raise
        except _TemplateLimitError as err:
            raise ModelLoadError(f"the model's chat template was stopped: {err}") from None
        except jinja2.exceptions.SecurityError as err:
            raise ModelLoadError(f"the model's chat template tried an unsafe operation: {err}") \
                from None
        except RecursionError:
            raise ModelLoadError("the model's chat template recursed too deeply") from None
        except Exception as err:
            raise ModelLoadError(
                f"the model's chat template failed to render: {type(err).__name__}: {err}"
            ) from None

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
        texts = _texts(messages)
        payload = [self._message_payload(m, lambda t: t, lambda: marker) for m in messages]
        _add_tool_fields(payload, messages, tools)
        return self._render_payload(payload, add_generation_prompt, _size(texts), tools)

    def render_prompt(
        self,
        messages: list[ChatMessage],
        marker: str,
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedPrompt:
        """Render a conversation into pieces: the template's text, the messages' text and
        the images' places (see :mod:`edge_vlm.prompt`).

        The template is rendered twice: once as :meth:`render` does, once with a unique
        placeholder standing for each message text and each image. The placeholders cut the
        second rendering into the template's own text; the first rendering is then matched
        against those cuts to find each message's text as the template printed it (as is,
        or stripped). A template that changes message text in another way gives one
        ``template`` piece with image places cut at the marker, after checking that no
        message text holds the marker (the tokenizer checks control tokens).

        Raises:
            RequestError: the template refused the conversation, or a message text holds
                the media marker and the template's output cannot be cut safely.
            ModelLoadError: the template broke a sandbox bound or failed.
        """
        texts = _texts(messages)
        chars = _size(texts)
        plain = [self._message_payload(m, lambda t: t, lambda: marker) for m in messages]
        _add_tool_fields(plain, messages, tools)
        real = self._render_payload(plain, add_generation_prompt, chars, tools)
        nonce = secrets.token_hex(4)
        counter = iter(range(1 << 30))
        originals: dict[str, PromptPiece] = {}

        def hold(text: str, kind: PieceKind = "text") -> str:
            key = f"\ue000{nonce}{next(counter)}\ue001"
            originals[key] = PromptPiece(kind, text)
            return key

        payload = [self._message_payload(m, hold, lambda: hold(marker, "image"))
                   for m in messages]
        _add_tool_fields(payload, messages, tools)
        held = self._render_payload(payload, add_generation_prompt, chars, tools)
        pieces = _align(real, held, originals, nonce)
        if pieces is not None:
            return RenderedPrompt(tuple(pieces))
        for i, text in enumerate(texts):
            if marker in text:
                raise RequestError(
                    f"messages: a message text holds the media marker {marker!r}, and this "
                    "model's chat template rewrites message text, so it cannot be kept "
                    "apart from the images; remove it from the text",
                    param=f"messages[{i}]")
        out: list[PromptPiece] = []
        for j, part in enumerate(real.split(marker)):
            if j:
                out.append(PromptPiece("image", marker))
            if part:
                out.append(PromptPiece("template", part))
        return RenderedPrompt(tuple(out), unchecked_texts=tuple(texts))

    def _message_payload(self, message: ChatMessage, text: Callable[[str], str],
                         image: Callable[[], str]) -> dict[str, Any]:
        """The template's view of a message: each text through ``text`` (itself, or a
        placeholder), each image as ``image()`` (the marker, or a placeholder)."""
        head: dict[str, Any] = {"role": message.role}
        if message.name:  # templates that print it get it as message text, never as tokens
            head["name"] = text(message.name)
        content = message.content
        if content is None or isinstance(content, str):
            return {**head, "content": text(content) if content else ""}
        parts: list[dict[str, str]] = []
        for part in content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": text(part.text)})
            elif isinstance(part, ImagePart):
                # As llama.cpp's server does: the image becomes the media marker, as text.
                parts.append({"type": "text", "text": image()})
        if self.typed_content:
            return {**head, "content": parts}
        return {**head, "content": "".join(p["text"] for p in parts)}


def _texts(messages: list[ChatMessage]) -> list[str]:
    out: list[str] = []
    for m in messages:
        if m.name:
            out.append(m.name)
        if isinstance(m.content, str):
            out.append(m.content)
        elif isinstance(m.content, list):
            out.extend(p.text for p in m.content if isinstance(p, TextPart))
    return out


def _size(texts: list[str]) -> int:
    return sum(len(t) for t in texts)


def _align(real: str, held: str, originals: dict[str, PromptPiece], nonce: str
           ) -> list[PromptPiece] | None:
    """Cut ``real`` into pieces using the placeholders of ``held``; None if it cannot."""
    cut = re.split(f"(\ue000{nonce}\\d+\ue001)", held)
    keys = cut[1::2]
    if len(set(keys)) != len(keys) or any(k not in originals for k in keys):
        return None  # the template printed a text twice or mangled a placeholder
    if sum(1 for p in originals.values() if p.kind == "image") != sum(
            1 for k in keys if originals[k].kind == "image"):
        return None  # an image dropped or repeated
    template = cut[0::2]
    if not real.startswith(template[0]):
        return None
    pos = len(template[0])
    pieces: list[PromptPiece] = [PromptPiece("template", template[0])] if template[0] else []
    last = len(keys) - 1
    for i, (key, after) in enumerate(zip(keys, template[1:], strict=True)):
        original = originals[key]
        found = None
        for shown in dict.fromkeys((original.text, original.text.strip(),
                                    original.text.lstrip(), original.text.rstrip())):
            end = pos + len(shown)
            if real.startswith(shown, pos) and real.startswith(after, end) and (
                    i < last or end + len(after) == len(real)):
                found = shown
                break
        if found is None:
            return None
        if found or original.kind == "image":
            pieces.append(PromptPiece(original.kind, found))
        pos += len(found)
        if after:
            pieces.append(PromptPiece("template", after))
        pos += len(after)
    return pieces if pos == len(real) else None


def _add_tool_fields(payload: list[dict[str, Any]], messages: list[ChatMessage],
                     tools: list[dict[str, Any]] | None) -> None:
    """Give the template's view of each message its ``tool_calls`` / ``tool_call_id``.

    A tool call's arguments are printed by the template as its own text (they are the
    model's earlier output, not a person's), so they are not kept apart as message text.
    """
    if tools is None and not any(m.tool_calls or m.tool_call_id for m in messages):
        return
    from edge_vlm.tools import template_tool_fields

    for item, m in zip(payload, messages, strict=True):
        item.update(template_tool_fields(m))
