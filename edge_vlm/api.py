"""The Python API: :func:`load` a model, then :meth:`VLM.chat` in the chat-completion schema.

```python
import edge_vlm
with edge_vlm.load("default") as vlm:
    reply = vlm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "photo.jpg"}},
        {"type": "text", "text": "Describe the image."}]}], max_tokens=64)
    print(reply.choices[0].message.content)
```
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from edge_vlm import diagnostics, prompt_images
from edge_vlm.backend.sampler import check_logit_bias, json_schema_grammar
from edge_vlm.chunks import SamplerParams
from edge_vlm.config import Settings, load_settings
from edge_vlm.engine import Engine, GenerationParams, PromptImage
from edge_vlm.errors import RequestError
from edge_vlm.image_source import ImagePolicy
from edge_vlm.limits import check_request_size
from edge_vlm.loader import LoadedModel, load_model
from edge_vlm.prompt import RenderedPrompt
from edge_vlm.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    Detail,
    ImagePart,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    new_completion_id,
    now,
    parse_request,
)
from edge_vlm.stats import usage
from edge_vlm.tools import ToolSetup, split_tool_calls, tool_setup


def load(
    model: str | Path | None = None,
    mmproj: str | Path | None = None,
    *,
    settings: Settings | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    gpu: Literal["auto", "on", "off"] | None = None,
    flash_attn: Literal["auto", "on", "off"] | None = None,
    allow_remote_images: bool | None = None,
    verbose: bool | None = None,
) -> VLM:
    """Load a vision-language model.

    Args:
        model: ``"default"`` (the shipped model), an installed model's name, or a GGUF path.
            None: ``settings.model.default``.
        mmproj: The vision projector GGUF for a model given as a path.
        settings: Settings to use (default: :func:`~edge_vlm.config.load_settings`); the
            keyword arguments below replace its values (``False`` and ``0`` included).
        n_ctx: Context window in tokens.
        threads: CPU threads, used as given (None: ``runtime.threads``; unset there, the
            count follows the machine's load, at most one per physical core).
        gpu: ``auto`` (offload when the build supports it), ``on`` or ``off``.
        flash_attn: ``auto``, ``on`` or ``off``.
        allow_remote_images: Fetch ``http(s)`` image URLs (off by default).
        verbose: Show llama.cpp's log.

    Raises:
        ModelNotFoundError: the model cannot be found.
        ModelLoadError: a file is invalid or the pair does not match.
    """
    settings = (settings if settings is not None else load_settings()).with_overrides({
        "runtime.n_ctx": n_ctx,
        "runtime.threads": threads,
        "runtime.gpu": gpu,
        "runtime.flash_attn": flash_attn,
        "images.allow_remote": allow_remote_images,
        "runtime.verbose": verbose,
    })
    name = model if model is not None else settings.model.default
    proj = mmproj if mmproj is not None else settings.model.mmproj
    return VLM(load_model(name, proj, settings), settings)


class VLM:
    """A loaded vision-language model answering chat-completion requests.

    Use it as a context manager or call :meth:`close`. Safe to share between threads:
    requests run one at a time.
    """

    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self._loaded = loaded
        self.settings = settings
        self.name = loaded.ref.name
        self.info = loaded.info
        self.engine: Engine = loaded.engine
        self._template = loaded.template

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Free the model, its context and the vision encoder."""
        self._loaded.close()

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- chat ------------------------------------------------------------------------

    @overload
    def chat(self, messages: Any = ..., *, stream: Literal[False] = ...,
             cancel: threading.Event | None = ..., policy: ImagePolicy | None = ...,
             model: str | None = ..., max_tokens: int | None = ...,
             max_completion_tokens: int | None = ..., temperature: float | None = ...,
             top_p: float | None = ..., top_k: int | None = ..., min_p: float | None = ...,
             seed: int | None = ..., stop: str | list[str] | None = ...,
             stream_options: StreamOptions | dict[str, Any] | None = ...,
             frequency_penalty: float | None = ..., presence_penalty: float | None = ...,
             repeat_penalty: float | None = ...,
             response_format: ResponseFormat | dict[str, Any] | None = ...,
             n: int | None = ..., logit_bias: dict[str, float] | None = ...,
             tools: list[Tool] | list[dict[str, Any]] | None = ...,
             tool_choice: str | NamedToolChoice | dict[str, Any] | None = ...,
             parallel_tool_calls: bool | None = ..., logprobs: bool | None = ...,
             top_logprobs: int | None = ..., detail: Detail | None = ...,
             **unknown: Any) -> ChatCompletion: ...

    @overload
    def chat(self, messages: Any = ..., *, stream: Literal[True],
             cancel: threading.Event | None = ..., policy: ImagePolicy | None = ...,
             model: str | None = ..., max_tokens: int | None = ...,
             max_completion_tokens: int | None = ..., temperature: float | None = ...,
             top_p: float | None = ..., top_k: int | None = ..., min_p: float | None = ...,
             seed: int | None = ..., stop: str | list[str] | None = ...,
             stream_options: StreamOptions | dict[str, Any] | None = ...,
             frequency_penalty: float | None = ..., presence_penalty: float | None = ...,
             repeat_penalty: float | None = ...,
             response_format: ResponseFormat | dict[str, Any] | None = ...,
             n: int | None = ..., logit_bias: dict[str, float] | None = ...,
             tools: list[Tool] | list[dict[str, Any]] | None = ...,
             tool_choice: str | NamedToolChoice | dict[str, Any] | None = ...,
             parallel_tool_calls: bool | None = ..., logprobs: bool | None = ...,
             top_logprobs: int | None = ..., detail: Detail | None = ...,
             **unknown: Any) -> Iterator[ChatCompletionChunk]: ...

    def chat(
        self,
        messages: Any = None,
        *,
        stream: bool = False,
        cancel: threading.Event | None = None,
        policy: ImagePolicy | None = None,
        # The request fields: one per field of ChatCompletionRequest (a test keeps them in
        # step), then ``detail``. None: the request's own value, else the settings' default.
        model: str | None = None,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stream_options: StreamOptions | dict[str, Any] | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        repeat_penalty: float | None = None,
        response_format: ResponseFormat | dict[str, Any] | None = None,
        n: int | None = None,
        logit_bias: dict[str, float] | None = None,
        tools: list[Tool] | list[dict[str, Any]] | None = None,
        tool_choice: str | NamedToolChoice | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        detail: Detail | None = None,
        **unknown: Any,
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """Answer a conversation.

        Args:
            messages: A list of messages (dicts in the OpenAI/HF form or
                :class:`~edge_vlm.schema.ChatMessage`), or a whole
                :class:`~edge_vlm.schema.ChatCompletionRequest` or its dict (whose fields
                the keyword arguments below replace).
            stream: Return an iterator of chunks; the last carries ``timings``.
            cancel: Set it from another thread to stop within one token.
            policy: Where images may come from (default: :meth:`image_policy`, from the
                settings); the server passes its own, stricter one.
            model: The model the request is for; must be this one (its name, or
                ``default`` for the shipped model).
            max_tokens: Most tokens to generate (default: ``sampling.max_tokens``).
            max_completion_tokens: The newer clients' name for ``max_tokens``.
            temperature: 0 is greedy and reproducible (default: ``sampling.temperature``).
            top_p: Nucleus sampling (default: ``sampling.top_p``).
            top_k: Sample among the k likeliest tokens (default: ``sampling.top_k``).
            min_p: Drop tokens below this share of the likeliest (default:
                ``sampling.min_p``).
            seed: Sampling seed, for reproducible answers at a temperature above 0.
            stop: Strings that end the answer; they are never part of it.
            stream_options: ``{"include_usage": True}`` adds a last chunk carrying usage.
            frequency_penalty: OpenAI's frequency penalty.
            presence_penalty: OpenAI's presence penalty.
            repeat_penalty: llama.cpp's repeat penalty (default: ``sampling.repeat_penalty``).
            response_format: ``{"type": "json_object"}`` or ``{"type": "json_schema",
                "json_schema": {...}}``: the answer is constrained to that form.
            n: Answers per request; only 1 is supported.
            logit_bias: Token id (as a string) to a bias from -100 to 100 added to its
                logit; -100 bans the token, 100 all but forces it.
            tools: OpenAI's tool list; rendered through the model's chat template (a
                template without tool support is a ``RequestError``).
            tool_choice: ``auto``, ``none``, ``required`` or
                ``{"type": "function", "function": {"name": ...}}``; a required or named
                call is constrained by a grammar.
            parallel_tool_calls: Accepted; a required or named call gives one call.
            logprobs: Return each answer token's log-probability.
            top_logprobs: With ``logprobs``: also the likeliest alternatives (0-20).
            detail: Image detail for the images that do not set their own
                (default: ``images.detail``): ``low``, ``high`` or ``auto``.
            **unknown: Refused: a misspelt field must not be dropped silently.

        Raises:
            RequestError: invalid request, naming the field (before any model work); an
                unknown keyword, naming it and the closest valid one.
            ImageError: an image could not be read or is not allowed.
            ContextOverflowError: the prompt and max_tokens do not fit the context.
        """
        if unknown:
            raise _unknown_keyword(sorted(unknown)[0])
        fields = {
            "model": model, "max_tokens": max_tokens,
            "max_completion_tokens": max_completion_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "min_p": min_p, "seed": seed, "stop": stop,
            "stream_options": stream_options, "frequency_penalty": frequency_penalty,
            "presence_penalty": presence_penalty, "repeat_penalty": repeat_penalty,
            "response_format": response_format, "n": n, "logit_bias": logit_bias,
            "tools": tools, "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls, "logprobs": logprobs,
            "top_logprobs": top_logprobs,
        }
        request = self._request(messages, stream, fields, detail)
        chunks = self._stream(request, cancel, policy)
        if request.stream:
            return chunks
        return self._collect(chunks)

    def _request(self, messages: Any, stream: bool, fields: dict[str, Any],
                 detail: Detail | None = None) -> ChatCompletionRequest:
        if isinstance(messages, ChatCompletionRequest):
            data = messages.model_dump(exclude_none=True, by_alias=True)
        elif isinstance(messages, dict):
            data = dict(messages)
        elif isinstance(messages, list):
            data = {"messages": [
                m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else m
                for m in messages
            ]}
        else:
            raise RequestError("messages: expected a list of messages or a request")
        data.update({k: v for k, v in fields.items() if v is not None})
        if stream:
            data["stream"] = True
        request = parse_request(data)
        if fields.get("model") is not None:
            self._check_model(request.model or "")
        if detail is not None:
            if detail not in ("auto", "low", "high"):
                raise RequestError(f"detail: must be auto, low or high, got {detail!r}",
                                   param="detail")
            for msg in request.messages:
                for part in msg.content if isinstance(msg.content, list) else ():
                    if isinstance(part, ImagePart) and part.image_url.detail is None:
                        part.image_url.detail = detail
        return request

    def _check_model(self, name: str) -> None:
        from edge_vlm.shipped import DEFAULT_NAMES, SHIPPED_MODEL

        if name == self.name or (name in DEFAULT_NAMES and self.name == SHIPPED_MODEL):
            return
        raise RequestError(
            f"model: this is model '{self.name}', the request is for '{name}'; load that "
            "model with edge_vlm.load(...), or leave model out", param="model")

    def _collect(self, chunks: Iterator[ChatCompletionChunk]) -> ChatCompletion:
        text: list[str] = []
        last: ChatCompletionChunk | None = None
        lps: list[TokenLogprob] = []
        calls: list[ToolCall] = []
        for chunk in chunks:
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                if choice.logprobs is not None and choice.logprobs.content:
                    lps.extend(choice.logprobs.content)
                calls.extend(ToolCall(**c.model_dump(exclude={"index"}))
                             for c in choice.delta.tool_calls or [])
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                last = chunk
        assert last is not None and last.timings is not None
        stats = last.timings
        return ChatCompletion(
            id=last.id, created=last.created, model=last.model,
            choices=[Choice(message=AssistantMessage(content="".join(text) if text or not calls
                                                     else None, tool_calls=calls or None),
                            finish_reason=last.choices[0].finish_reason,
                            logprobs=ChoiceLogprobs(content=lps) if lps else None)],
            usage=usage(stats), timings=stats,
        )

    def answer_read(
        self,
        request: ChatCompletionRequest,
        image_data: Sequence[bytes],
        *,
        cancel: threading.Event | None = None,
        policy: ImagePolicy | None = None,
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """Answer a request already validated, whose images were already read.

        The server's path: it validated the request and read every image (under its own
        policy) once; nothing is validated, fetched or base64-decoded a second time.

        Args:
            request: The validated request (``request.stream`` decides the return type).
            image_data: Each image part's encoded bytes, in the order of the parts.
            cancel: Set it from another thread to stop within one token.
            policy: The pixel limit for decoding (default: from the settings).
        """
        chunks = self._stream(request, cancel, policy, image_data)
        return chunks if request.stream else self._collect(chunks)

    def _stream(
        self, request: ChatCompletionRequest, cancel: threading.Event | None,
        policy: ImagePolicy | None = None, image_data: Sequence[bytes] | None = None,
    ) -> Iterator[ChatCompletionChunk]:
        t_start = time.perf_counter()
        tools = tool_setup(request, self._template.source, self.name)
        prompt = self.render_prompt(request.messages, tools=tools.tools if tools else None)
        images = self.load_images(request.messages, policy, image_data)
        params = self._params(request)
        if tools is not None and tools.schema is not None:  # a call is required
            params.sampler = dataclasses.replace(
                params.sampler, grammar=json_schema_grammar(tools.schema))
        params.max_image_tokens = self.image_budget([im.detail for im in images])
        cid, created = new_completion_id(), now()
        events = self.engine.generate(prompt, images, params, cancel=cancel, t_start=t_start)
        if tools is not None:
            events = _tool_events(events, tools)
        return self._chunks(request, events, cid, created)

    def _chunks(self, request: ChatCompletionRequest, events: Any, cid: str,
                created: int) -> Iterator[ChatCompletionChunk]:
        def make(delta: Delta, finish: Any = None, **extra: Any) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=cid, created=created, model=self.name,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                                       **extra)

        first = True
        for ev in events:
            if first:
                yield make(Delta(role="assistant", content=""))
                first = False
            if ev.text or ev.logprobs:
                lp = ChoiceLogprobs(content=ev.logprobs) if ev.logprobs is not None else None
                yield ChatCompletionChunk(id=cid, created=created, model=self.name, choices=[
                    ChunkChoice(delta=Delta(content=ev.text), logprobs=lp)])
            if getattr(ev, "tool_calls", None):
                yield make(Delta(tool_calls=[ToolCallDelta(index=i, **c.model_dump())
                                             for i, c in enumerate(ev.tool_calls)]))
            if ev.finish_reason is not None:
                yield make(Delta(), ev.finish_reason, timings=ev.stats)
                if request.stream_options and request.stream_options.include_usage:
                    assert ev.stats is not None
                    yield ChatCompletionChunk(id=cid, created=created, model=self.name,
                                              choices=[], usage=usage(ev.stats))

    # -- batch -----------------------------------------------------------------------

    def batch(self, items: Iterable[Any], prompts: Sequence[str] = (),
              **kwargs: Any) -> Iterator[Any]:
        """Ask every prompt about every image, one image at a time; yields ``BatchResult``s.

        A shortcut for :func:`edge_vlm.batch.runner.batch` with this model (every keyword
        is that function's: ``out``, ``resume``, ``max_tokens``, ``schema``, ...).
        """
        from edge_vlm.batch.runner import batch  # batch builds on this API, not the reverse

        return batch(self, items, prompts, **kwargs)

    # -- request preparation ---------------------------------------------------------

    def image_policy(self) -> ImagePolicy:
        """The image policy built from the settings (the server builds its own)."""
        return ImagePolicy.from_settings(self.settings.images)

    def image_budget(self, details: Sequence[str]) -> int:
        """The request's image-token budget for its images' detail levels: the highest
        detail any of them asks for (libmtmd preprocesses all images of a prompt alike)."""
        return prompt_images.image_budget(self.info, self.settings.images, details)

    def max_side(self, detail: str) -> int:
        """The longest image side worth handing to the vision encoder."""
        return prompt_images.max_side(self.info, self.settings.images, detail)

    def load_images(
        self, messages: list[ChatMessage], policy: ImagePolicy | None = None,
        image_data: Sequence[bytes] | None = None,
    ) -> list[PromptImage]:
        """Read, decode and downscale every image of a conversation, in order (from
        ``image_data``, the images' bytes already read, when given)."""
        return prompt_images.load_images(self.info, self.settings.images, messages, policy,
                                         image_data)

    def render(self, messages: list[ChatMessage],
               tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text, one media marker per image (and the tools, if any)."""
        return self.render_prompt(messages, tools=tools).text

    def render_prompt(self, messages: list[ChatMessage],
                      tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
        """The prompt as template text, message text and image places (message text is
        tokenized as plain text: it cannot forge a turn or move an image).

        Raises:
            RequestTooLargeError: more messages or text than ``limits`` allow.
        """
        check_request_size(messages, self.settings.limits)
        return self._template.render_prompt(messages, self.engine.backend.marker, tools=tools)

    def _params(self, request: ChatCompletionRequest) -> GenerationParams:
        s = self.settings.sampling
        grammar = None
        if request.response_format is not None:
            try:
                schema = request.response_format.schema_dict()
            except ValueError as err:
                raise RequestError(f"response_format: {err}", param="response_format") from None
            if schema is not None:
                grammar = json_schema_grammar(schema, request.response_format.schema_field())
        temperature = request.temperature if request.temperature is not None else s.temperature
        return GenerationParams(
            max_tokens=request.token_limit or s.max_tokens,
            stop=request.stop_strings,
            logprobs=request.logprobs_k,
            sampler=SamplerParams(
                temperature=temperature,
                top_p=request.top_p if request.top_p is not None else s.top_p,
                top_k=request.top_k if request.top_k is not None else s.top_k,
                min_p=request.min_p if request.min_p is not None else s.min_p,
                repeat_penalty=(request.repeat_penalty if request.repeat_penalty is not None
                                else s.repeat_penalty),
                frequency_penalty=request.frequency_penalty or 0.0,
                presence_penalty=request.presence_penalty or 0.0,
                seed=request.seed,
                grammar=grammar,
                logit_bias=self._logit_bias(request),
            ),
        )

    def _logit_bias(self, request: ChatCompletionRequest) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token, bias) pairs, checked against the vocabulary now, before
        any model work."""
        if not request.logit_bias:
            return ()
        pairs = tuple((int(k), float(v)) for k, v in request.logit_bias.items())
        check_logit_bias(pairs, self.engine.backend.n_vocab)
        return pairs

    # -- debugging hooks (parity checks and tests) -----------------------------------

    def debug_prompt_chunks(self, messages: list[Any]) -> list[tuple[str, list[int] | int]]:
        """The prompt as libmtmd tokenizes it: ``("text", ids)`` and ``("image", n_tokens)``."""
        req = self._request(messages, False, {})
        images = self.load_images(req.messages)
        return diagnostics.prompt_chunks(self.engine, self.render_prompt(req.messages), images)

    def debug_last_logits(self, messages: list[Any]) -> npt.NDArray[np.float32]:
        """Logits at the last prompt position (generation prompt added)."""
        req = self._request(messages, False, {})
        images = self.load_images(req.messages)
        return self.engine.prompt_logits(self.render_prompt(req.messages), images)

    def debug_image_embeddings(self, url: str) -> npt.NDArray[np.float32]:
        """The vision encoder's output for one image: ``[n_tokens, n_embd]``."""
        images = self.load_images(parse_request({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}).messages)
        return diagnostics.image_embeddings(self.engine, images)


def _unknown_keyword(name: str) -> RequestError:
    valid = [*ChatCompletionRequest.model_fields, "detail", "stream", "cancel", "policy"]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(sorted(valid))}"
    return RequestError(f"{name}: not a field of a chat request ({hint})", param=name)


def _tool_events(events: Iterator[Any], tools: ToolSetup) -> Iterator[Any]:
    """Hold a tool-using answer's text to its end, then split it into text and calls
    (:func:`edge_vlm.tools.split_tool_calls`); a call makes the finish ``tool_calls``."""
    held: list[str] = []
    for ev in events:
        if ev.finish_reason is None:
            held.append(ev.text)
            continue
        content, calls = split_tool_calls("".join(held) + ev.text, tools)
        ev.text = content or ""
        ev.tool_calls = calls
        if calls and ev.finish_reason in ("stop", "length"):
            ev.finish_reason = "tool_calls"
        yield ev
