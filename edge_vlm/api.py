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

import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
from PIL import Image

from edge_vlm.backend import RGBImage, SamplerParams
from edge_vlm.config import Settings, load_settings
from edge_vlm.engine import Engine, GenerationParams, PromptImage
from edge_vlm.errors import RequestError
from edge_vlm.images import ImagePolicy, load_image
from edge_vlm.loader import LoadedModel, load_model
from edge_vlm.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    GenerationStats,
    ImagePart,
    Usage,
    new_completion_id,
    now,
    parse_request,
)


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
        settings: Settings to use (default: :func:`~edge_vlm.config.load_settings`).
        n_ctx: Context window in tokens.
        threads: CPU threads.
        gpu: ``auto`` (offload when the build supports it), ``on`` or ``off``.
        flash_attn: ``auto``, ``on`` or ``off``.
        allow_remote_images: Fetch ``http(s)`` image URLs (off by default).
        verbose: Show llama.cpp's log.

    Raises:
        ModelNotFoundError: the model cannot be found.
        ModelLoadError: a file is invalid or the pair does not match.
    """
    overrides = {
        "runtime.n_ctx": n_ctx,
        "runtime.threads": threads,
        "runtime.gpu": gpu,
        "runtime.flash_attn": flash_attn,
        "images.allow_remote": allow_remote_images,
        "runtime.verbose": verbose,
    }
    if settings is None:
        settings = load_settings(overrides)
    elif any(v is not None for v in overrides.values()):
        settings = load_settings(
            {**_flatten(settings.model_dump()), **{k: v for k, v in overrides.items() if v}})
    name = model if model is not None else settings.model.default
    proj = mmproj if mmproj is not None else settings.model.mmproj
    return VLM(load_model(name, proj, settings), settings)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
             **fields: Any) -> ChatCompletion: ...

    @overload
    def chat(self, messages: Any = ..., *, stream: Literal[True],
             cancel: threading.Event | None = ..., policy: ImagePolicy | None = ...,
             **fields: Any) -> Iterator[ChatCompletionChunk]: ...

    def chat(
        self,
        messages: Any = None,
        *,
        stream: bool = False,
        cancel: threading.Event | None = None,
        policy: ImagePolicy | None = None,
        **fields: Any,
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """Answer a conversation.

        Args:
            messages: A list of messages (dicts in the OpenAI/HF form or
                :class:`~edge_vlm.schema.ChatMessage`), or a whole
                :class:`~edge_vlm.schema.ChatCompletionRequest` or its dict.
            stream: Return an iterator of chunks; the last carries ``timings``.
            cancel: Set it from another thread to stop within one token.
            policy: Where images may come from (default: :meth:`image_policy`, from the
                settings); the server passes its own, stricter one.
            **fields: Request fields: ``max_tokens``, ``temperature``, ``seed``, ``stop``,
                ``response_format``, ``top_p``, ...

        Raises:
            RequestError: invalid request, naming the field (before any model work).
            ImageError: an image could not be read or is not allowed.
            ContextOverflowError: the prompt and max_tokens do not fit the context.
        """
        request = self._request(messages, stream, fields)
        chunks = self._stream(request, cancel, policy)
        if request.stream:
            return chunks
        return self._collect(chunks)

    def _request(self, messages: Any, stream: bool, fields: dict[str, Any]) -> (
            ChatCompletionRequest):
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
        data.update(fields)
        if stream:
            data["stream"] = True
        return parse_request(data)

    def _collect(self, chunks: Iterator[ChatCompletionChunk]) -> ChatCompletion:
        text: list[str] = []
        last: ChatCompletionChunk | None = None
        for chunk in chunks:
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                last = chunk
        assert last is not None and last.timings is not None
        stats = last.timings
        return ChatCompletion(
            id=last.id, created=last.created, model=last.model,
            choices=[Choice(message=AssistantMessage(content="".join(text)),
                            finish_reason=last.choices[0].finish_reason)],
            usage=_usage(stats), timings=stats,
        )

    def _stream(
        self, request: ChatCompletionRequest, cancel: threading.Event | None,
        policy: ImagePolicy | None = None,
    ) -> Iterator[ChatCompletionChunk]:
        t_start = time.perf_counter()
        images = self.load_images(request.messages, policy)
        text = self.render(request.messages)
        params = self._params(request)
        params.max_image_tokens = self.image_budget([im.detail for im in images])
        cid, created = new_completion_id(), now()
        events = self.engine.generate(text, images, params, cancel=cancel, t_start=t_start)
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
            if ev.text:
                yield make(Delta(content=ev.text))
            if ev.finish_reason is not None:
                yield make(Delta(), ev.finish_reason, timings=ev.stats)
                if request.stream_options and request.stream_options.include_usage:
                    assert ev.stats is not None
                    yield ChatCompletionChunk(id=cid, created=created, model=self.name,
                                              choices=[], usage=_usage(ev.stats))

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
        s = self.settings.images
        return ImagePolicy(
            allow_local_files=s.allow_local_files,
            allow_remote=s.allow_remote,
            allowed_hosts=tuple(s.allowed_hosts),
            max_bytes=s.max_bytes,
            max_pixels=s.max_pixels,
        )

    def image_budget(self, details: Sequence[str]) -> int:
        """The request's image-token budget for its images' detail levels: the highest
        detail any of them asks for (libmtmd preprocesses all images of a prompt alike)."""
        s = self.settings.images
        budgets = [self.info.image_token_budget(d, s.max_image_tokens, s.max_tiles)
                   for d in details]
        if not budgets:
            return 0
        return 0 if 0 in budgets else max(budgets)

    def max_side(self, detail: str) -> int:
        """The longest image side worth handing to the vision encoder."""
        side = self.info.max_image_side(detail)
        s = self.settings.images
        budget = self.info.image_token_budget(detail, s.max_image_tokens, s.max_tiles)
        if budget and self.info.tokens_per_tile and self.info.image_size:
            # A token budget caps the pixels libmtmd keeps: decode no larger than that.
            tiles_per_side = math.ceil(math.sqrt(budget / self.info.tokens_per_tile))
            side = min(side, self.info.image_size * tiles_per_side)
        if self.settings.images.max_side:
            side = min(side, self.settings.images.max_side)
        return side

    def load_images(
        self, messages: list[ChatMessage], policy: ImagePolicy | None = None
    ) -> list[PromptImage]:
        """Read, decode and downscale every image of a conversation, in order."""
        policy = policy or self.image_policy()
        parts = [(f"messages[{i}].content[{j}].image_url.url", part.image_url.url,
                  part.image_url.detail or self.settings.images.detail)
                 for i, msg in enumerate(messages) if isinstance(msg.content, list)
                 for j, part in enumerate(msg.content) if isinstance(part, ImagePart)]
        square = self.info.one_tile_side(self.image_budget([d for _, _, d in parts]))
        out: list[PromptImage] = []
        for field, url, detail in parts:
            img = load_image(url, policy, max_side=self.max_side(detail), field=field)
            t0 = time.perf_counter()
            pixels, identity = img.image, f"{img.identity}:{detail}"
            if square and pixels.size != (square, square):
                # Stretched, as libmtmd stretches the overview: then the overview and the
                # only slice are one picture, encoded once (see ModelInfo.one_tile_side).
                pixels = pixels.resize((square, square), Image.Resampling.BICUBIC)
                identity += f":sq{square}"
            ms = img.decode_ms + (time.perf_counter() - t0) * 1000.0
            rgb = RGBImage(pixels.width, pixels.height, pixels.tobytes(), identity)
            out.append(PromptImage(rgb=rgb, detail=detail, decode_ms=ms))
        return out

    def render(self, messages: list[ChatMessage]) -> str:
        """The prompt text, one media marker per image."""
        return self._template.render(messages, self.engine.backend.marker)

    def _params(self, request: ChatCompletionRequest) -> GenerationParams:
        s = self.settings.sampling
        grammar = None
        if request.response_format is not None:
            try:
                schema = request.response_format.schema_dict()
            except ValueError as err:
                raise RequestError(f"response_format: {err}", param="response_format") from None
            if schema is not None:
                from edge_vlm.backend import json_schema_grammar

                grammar = json_schema_grammar(schema)
        temperature = request.temperature if request.temperature is not None else s.temperature
        return GenerationParams(
            max_tokens=request.token_limit or s.max_tokens,
            stop=request.stop_strings,
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
            ),
        )

    # -- debugging hooks (parity checks and tests) -----------------------------------

    def debug_prompt_chunks(self, messages: list[Any]) -> list[tuple[str, list[int] | int]]:
        """The prompt as libmtmd tokenizes it: ``("text", ids)`` and ``("image", n_tokens)``."""
        from edge_vlm.backend import TextChunk

        req = self._request(messages, False, {})
        images = self.load_images(req.messages)
        with self.engine.lock, self.engine.tokenize(self.render(req.messages), images) as ch:
            return [("text", list(c.tokens)) if isinstance(c, TextChunk) else ("image", c.n_tokens)
                    for c in ch.items]

    def debug_last_logits(self, messages: list[Any]) -> npt.NDArray[np.float32]:
        """Logits at the last prompt position (generation prompt added)."""
        req = self._request(messages, False, {})
        images = self.load_images(req.messages)
        return self.engine.prompt_logits(self.render(req.messages), images)

    def debug_image_embeddings(self, url: str) -> npt.NDArray[np.float32]:
        """The vision encoder's output for one image: ``[n_tokens, n_embd]``."""
        from edge_vlm.backend import ImageChunk

        images = self.load_images(parse_request({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}).messages)
        backend = self.engine.backend
        with self.engine.lock, self.engine.tokenize(backend.marker, images) as chunks:
            ch = next(c for c in chunks.items if isinstance(c, ImageChunk))
            return backend.encode_image(chunks, ch)


def _usage(stats: GenerationStats) -> Usage:
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                 total_tokens=stats.prompt_tokens + stats.completion_tokens)
