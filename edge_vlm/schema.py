"""The one chat-message schema: OpenAI / Hugging Face chat-completion request and response.

Field for field what ``huggingface_hub.InferenceClient.chat_completion`` and the OpenAI SDK
send and read. The Python API, the CLI, the TUI and the server all build and consume these
models; there is no second message format. Unknown fields from newer clients are ignored.

Validation happens here, at the edge, before any model work: :func:`parse_request` turns a
plain dict into a :class:`ChatCompletionRequest` or raises :class:`~edge_vlm.errors.RequestError`
naming the exact field, e.g. ``messages[1].content[0].image_url.url``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_vlm.errors import RequestError, RequestTooLargeError

#: The largest ``max_tokens`` accepted before the context check (a sanity bound).
MAX_TOKENS_LIMIT = 1_000_000
#: ``frequency_penalty`` / ``presence_penalty`` range (OpenAI's).
PENALTY_LIMIT = 2.0
#: Largest ``repeat_penalty`` (llama.cpp divides logits by it; it must be above 0).
MAX_REPEAT_PENALTY = 10.0
#: Largest ``top_k`` (beyond any vocabulary; llama.cpp takes a 32-bit int).
MAX_TOP_K = 1_000_000
#: Most ``logit_bias`` entries and their value range (OpenAI's).
MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_LIMIT = 100.0
#: Most stop strings and the longest one.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000
#: Deepest nesting of lists and objects in a request given to :func:`parse_request`.
MAX_NESTING = 64
#: The most alternatives per token ``top_logprobs`` may ask for (OpenAI's bound).
MAX_TOP_LOGPROBS = 20

Detail = Literal["auto", "low", "high"]
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ImageURL(_Model):
    """The ``image_url`` object of an image part."""

    url: str
    """A ``data:`` URL, a local path or ``file://`` URL, or an ``http(s)`` URL (when allowed)."""
    detail: Detail | None = None
    """How much detail to encode: ``low`` (one tile), ``high`` (full tiling), ``auto``."""


class TextPart(_Model):
    """A text part of a message's content."""

    type: Literal["text"] = "text"
    text: str


class ImagePart(_Model):
    """An image part of a message's content."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Model):
    """The function a tool call invokes: its name and JSON-encoded arguments."""

    name: str
    arguments: str = "{}"
    """The arguments as a JSON string (as OpenAI sends and expects them)."""


class ToolCall(_Model):
    """One tool call of an assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Model):
    """A function the model may call."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    """A JSON schema of the arguments."""
    strict: bool | None = None


class Tool(_Model):
    """A tool offered to the model (only functions exist)."""

    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Model):
    """``tool_choice`` naming the function the model must call."""

    type: Literal["function"] = "function"
    function: dict[str, str]

    @property
    def name(self) -> str:
        """The function's name."""
        return self.function.get("name", "")


class ChatMessage(_Model):
    """One message of a conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    """Who wrote it (``tool``: a tool's result; ``developer``, OpenAI's newer name for
    ``system``, is read as ``system``). Images are allowed only in ``user`` messages."""
    content: str | list[ContentPart] | None = None
    """A string, or a list of text and image parts in the order they are shown."""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant message's tool calls (sent back with the conversation)."""
    tool_call_id: str | None = None
    """A tool message: the id of the call it answers."""

    @model_validator(mode="before")
    @classmethod
    def _developer_is_system(cls, data: Any) -> Any:
        # OpenAI's newer name for the system role (o1 and later; the SDKs send it).
        if isinstance(data, dict) and data.get("role") == "developer":
            return {**data, "role": "system"}
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _content_kind(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError(
                f"must be a string or a list of content parts, got {type(v).__name__}")
        return v

    @model_validator(mode="after")
    def _images_only_from_user(self) -> ChatMessage:
        if self.role != "user" and isinstance(self.content, list):
            for part in self.content:
                if isinstance(part, ImagePart):
                    article = "an" if self.role[0] in "aeiou" else "a"
                    raise ValueError(
                        f"images are only allowed in user messages, not in {article} "
                        f"{self.role} message"
                    )
        return self

    def text(self) -> str:
        """The message's text parts joined together (images left out)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[ImageURL]:
        """The message's image parts in order."""
        if not isinstance(self.content, list):
            return []
        return [p.image_url for p in self.content if isinstance(p, ImagePart)]


class JSONSchemaSpec(_Model):
    """OpenAI's ``response_format.json_schema`` object."""

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Model):
    """Constrains the answer's form.

    ``text`` (no constraint), ``json_object`` (any JSON object), ``json_schema`` (OpenAI:
    ``json_schema.schema``), or Hugging Face's ``{"type": "json", "value": schema}``.
    """

    type: Literal["text", "json_object", "json_schema", "json"] = "text"
    json_schema: JSONSchemaSpec | None = None
    value: dict[str, Any] | None = None

    def schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema to constrain to, ``{}`` for any JSON object, None for free text."""
        if self.type == "text":
            return None
        if self.type in ("json_object", "json"):
            # HF's client sends {"type": "json_object", "value": schema} for json_schema.
            return self.value or {"type": "object"}
        if self.json_schema is None:
            raise ValueError("response_format.type is 'json_schema' but json_schema is missing")
        return self.json_schema.schema_ or {"type": "object"}

    def schema_field(self) -> str:
        """Where :meth:`schema_dict`'s schema is in the request (for error messages)."""
        if self.type == "json_schema":
            return "response_format.json_schema.schema"
        return "response_format.value"


class StreamOptions(_Model):
    """``stream_options``: ``include_usage`` adds a last chunk carrying usage."""

    include_usage: bool = False


class ChatCompletionRequest(_Model):
    """A chat-completion request (OpenAI / HF ``chat_completion``)."""

    model: str | None = None
    """A model name from the store, a GGUF path, ``default`` or None for the default."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    """Most tokens to generate (``max_completion_tokens`` is an alias from newer clients)."""
    max_completion_tokens: int | None = None
    temperature: float | None = None
    """0 is greedy and reproducible."""
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    """Strings that end the answer; they are never part of the output."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    """-2 to 2 (OpenAI): subtracted from a token's logit once per earlier occurrence."""
    presence_penalty: float | None = None
    """-2 to 2 (OpenAI): subtracted from a token's logit once if it occurred before."""
    repeat_penalty: float | None = None
    """Above 0, at most 10 (llama.cpp's): 1 is off, above 1 discourages repeats."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as OpenAI sends it) to a bias from -100 to 100 added to its
    logit; -100 bans a token, 100 all but forces it."""
    response_format: ResponseFormat | None = None
    n: int | None = None
    """Only 1 is supported."""
    tools: list[Tool] | None = None
    """Functions the model may call (rendered through the model's chat template)."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """``auto`` (default with tools), ``none``, ``required`` or a named function."""
    parallel_tool_calls: bool | None = None
    """Whether several calls may come in one answer (default true)."""
    logprobs: bool | None = None
    """Return the log-probability of each chosen token."""
    top_logprobs: int | None = None
    """With ``logprobs``: also the most likely alternatives at each position (0-20)."""

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _positive_tokens(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_TOKENS_LIMIT:
            raise ValueError(f"must be between 1 and {MAX_TOKENS_LIMIT}, got {v}")
        return v

    @field_validator("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                     "repeat_penalty")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty_range(cls, v: float | None) -> float | None:
        if v is not None and not -PENALTY_LIMIT <= v <= PENALTY_LIMIT:
            raise ValueError(f"must be between -{PENALTY_LIMIT:g} and {PENALTY_LIMIT:g}, got {v}")
        return v

    @field_validator("repeat_penalty")
    @classmethod
    def _repeat_penalty_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= MAX_REPEAT_PENALTY:
            raise ValueError(
                f"must be above 0 and at most {MAX_REPEAT_PENALTY:g} (1: off), got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_K:
            raise ValueError(f"must be between 0 (off) and {MAX_TOP_K}, got {v}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"holds {len(v)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}")
        for key, bias in v.items():
            if not key.isascii() or not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids (0, 1, 2, ...), got {key!r}")
            if not math.isfinite(bias) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"the bias of token {key} must be between "
                                 f"-{LOGIT_BIAS_LIMIT:g} and {LOGIT_BIAS_LIMIT:g}, got {bias}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 2.0:
            raise ValueError(f"must be between 0 and 2, got {v}")
        return v

    @field_validator("top_p", "min_p")
    @classmethod
    def _probability(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"must be between 0 and 1, got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only n=1 is supported, got {v}: send {v} requests instead")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
            raise ValueError(f"must be between 0 and {MAX_TOP_LOGPROBS}, got {v}")
        return v

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_k(self) -> int | None:
        """How many alternatives to report per token, None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"holds {len(items)} stop strings; at most {MAX_STOP_STRINGS}")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        return v

    @property
    def token_limit(self) -> int | None:
        """``max_tokens``, or ``max_completion_tokens`` when only that was given."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(_Model):
    """Token counts; ``prompt_tokens`` includes image tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ImageStats(_Model):
    """How one image of the prompt was handled."""

    identity: str
    """Content identity (hash of the preprocessed pixels)."""
    width: int
    height: int
    detail: str = "auto"
    tiles: int = 1
    """Image chunks in the prompt (an overview plus slices for tiling projectors)."""
    encoded: int = 0
    """Vision-encoder passes run for it (tiles not served by a cache or a copy)."""
    tokens: int = 0
    decode_ms: float = 0.0
    encode_ms: float = 0.0
    cache_hit: bool = False
    """True when the encoder output came from the embedding cache or the KV prefix."""


class GenerationStats(_Model):
    """Timings of one answer (the ``timings`` of a response, as llama.cpp's server reports)."""

    prompt_tokens: int = 0
    """All prompt tokens, text and image."""
    prompt_tokens_reused: int = 0
    """Prompt tokens already in the KV cache from the previous request (not evaluated)."""
    prompt_tokens_evaluated: int = 0
    image_tokens: int = 0
    image_decode_ms: float = 0.0
    """Reading and decoding the image files (Pillow)."""
    image_encode_ms: float = 0.0
    """The vision encoder."""
    images: list[ImageStats] = Field(default_factory=list)
    prompt_eval_ms: float = 0.0
    """Evaluating the prompt in the language model (text and image embeddings)."""
    prompt_tps: float = 0.0
    ttft_ms: float = 0.0
    """Time to first token, from the request to the first generated token."""
    completion_tokens: int = 0
    decode_ms: float = 0.0
    decode_tps: float = 0.0
    total_ms: float = 0.0
    n_ctx: int = 0
    context_used: int = 0
    """Tokens in the context after the answer."""
    peak_rss_mb: float = 0.0
    embedding_cache_hits: int = 0
    encode_ms_saved: float = 0.0


class TopLogprob(_Model):
    """One candidate token at a position, with its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    """The token's UTF-8 bytes (a token may hold part of a character)."""


class TokenLogprob(TopLogprob):
    """The chosen token at a position, and the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Model):
    """A choice's ``logprobs``: one entry per generated token."""

    content: list[TokenLogprob] | None = None


class AssistantMessage(_Model):
    """The answer."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(_Model):
    """One choice of a non-streamed response."""

    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Model):
    """A non-streamed chat-completion response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    timings: GenerationStats | None = None
    """edge-vlm's stats (ignored by OpenAI/HF clients)."""


class ToolCallDelta(ToolCall):
    """A tool call in a stream chunk (sent whole, with its index)."""

    index: int = 0


class Delta(_Model):
    """The increment of a streamed choice."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Model):
    """One choice of a stream chunk."""

    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Model):
    """A streamed chat-completion chunk; the last one carries ``timings``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    timings: GenerationStats | None = None


def new_completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix time for the ``created`` field."""
    return int(time.time())


def field_path(loc: tuple[int | str, ...], raw: Any) -> str:
    """Render a pydantic error location as ``messages[1].content[0].image_url.url``.

    Union branch labels and discriminator tags that pydantic inserts are dropped by walking
    the raw input alongside the location.
    """
    out = ""
    cur: Any = raw
    after_index = False
    for item in loc:
        if isinstance(item, int):
            if isinstance(cur, list) and 0 <= item < len(cur):
                cur = cur[item]
            out += f"[{item}]"
            after_index = True
            continue
        if after_index and isinstance(cur, dict) and cur.get("type") == item:
            after_index = False
            continue  # the discriminator tag of a content part
        after_index = False
        if isinstance(cur, dict) and item in cur:
            cur = cur[item]
        elif "[" in item or item in {"str", "int", "float", "bool"}:
            continue  # a union branch label
        out += f".{item}" if out else item
    return out or "request"


def _child(cur: Any, item: int | str) -> tuple[bool, Any]:
    """Step into a list index or dict key of the raw input, if it is there."""
    if isinstance(item, int) and isinstance(cur, list) and 0 <= item < len(cur):
        return True, cur[item]
    if isinstance(item, str) and isinstance(cur, dict) and item in cur:
        return True, cur[item]
    return False, None


def _branch_mismatch(loc: tuple[int | str, ...], raw: Any) -> bool:
    """True when an error belongs to a union branch whose type the input does not have."""
    cur: Any = raw
    for item in loc:
        found, child = _child(cur, item)
        if found:
            cur = child
        elif item == "str":
            return not isinstance(cur, str)
        elif isinstance(item, str) and item.startswith("list["):
            return not isinstance(cur, list)
    return False


def format_validation_error(err: ValidationError, raw: Any) -> RequestError:
    """Turn a pydantic error into one RequestError naming the most relevant field."""
    errors = err.errors(include_url=False)
    relevant = [e for e in errors if not _branch_mismatch(tuple(e["loc"]), raw)] or errors
    first = relevant[0]
    path = field_path(tuple(first["loc"]), raw)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "is required"
    elif first["type"] == "too_short" and path == "messages":
        msg = "must hold at least one message"
    elif first["type"] in {"literal_error", "union_tag_invalid"}:
        msg = f"{msg} (got {first.get('input')!r})"
    more = f" (and {len(relevant) - 1} more problems)" if len(relevant) > 1 else ""
    return RequestError(f"{path}: {msg}{more}", param=path)


def parse_request(data: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionRequest:
    """Validate a request given as a model or a plain dict.

    Raises:
        RequestError: naming the first invalid field and what is wrong with it.
    """
    if isinstance(data, ChatCompletionRequest):
        return data
    if not isinstance(data, dict):
        raise RequestError(f"request: expected a JSON object, got {type(data).__name__}")
    check_text_and_nesting(data)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        raise format_validation_error(err, data) from None


def _path(parts: list[int | str]) -> str:
    out = ""
    for item in parts:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out or "request"


def _lone_surrogate(text: str) -> int:
    """The index of the first lone UTF-16 surrogate in ``text``, or -1."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return -1


def check_text_and_nesting(data: Any) -> None:
    """Refuse text that is not text and nesting deeper than :data:`MAX_NESTING`.

    JSON allows ``"\ud800"``, a lone UTF-16 surrogate, which no UTF-8 encoder (the
    tokenizer's, the grammar's) accepts. Walked without recursion, so a hostile depth
    cannot exhaust Python's stack.

    Raises:
        RequestError: naming the field, e.g. ``messages[0].content[1].text``.
    """
    stack: list[tuple[Any, list[int | str]]] = [(data, [])]
    while stack:
        node, where = stack.pop()
        if len(where) > MAX_NESTING:
            raise RequestTooLargeError(
                f"{_path(where)}: the request is nested deeper than {MAX_NESTING} levels",
                param=_path(where))
        if isinstance(node, str):
            at = _lone_surrogate(node)
            if at >= 0:
                raise RequestError(
                    f"{_path(where)}: holds a lone UTF-16 surrogate "
                    f"(U+{ord(node[at]):04X} at character {at}), which is not text; send "
                    "valid Unicode", param=_path(where))
        elif isinstance(node, dict):
            for key, value in reversed(list(node.items())):
                if isinstance(key, str) and _lone_surrogate(key) >= 0:
                    raise RequestError(
                        f"{_path(where)}: a key holds a lone UTF-16 surrogate, which is not "
                        "text; send valid Unicode", param=_path(where))
                stack.append((value, [*where, str(key)]))
        elif isinstance(node, (list, tuple)):
            stack.extend((value, [*where, i]) for i, value in reversed(list(enumerate(node))))


def parse_messages(messages: list[Any]) -> list[ChatMessage]:
    """Validate a list of messages given as models or plain dicts (for the Python API)."""
    raw = [m.model_dump(exclude_none=True) if isinstance(m, BaseModel) else m for m in messages]
    return parse_request({"messages": raw}).messages
