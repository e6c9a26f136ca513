"""The endpoints: chat completions (both URL layouts), the Responses API, the Hugging Face
text-generation form, the model list, health.

Order of checks for every answer: body (size, JSON, depth) → schema and limits → model
name → images (under the server's policy) → response cache → model queue → generation.
Nothing reaches the model before every check passed.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edge_vlm.errors import EdgeVLMError, ModelNotFoundError
from edge_vlm.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    new_completion_id,
    now,
)
from edge_vlm.server import hfraw
from edge_vlm.server.answer import (
    EventStream,
    Job,
    Watch,
    chat_events,
    completion_body,
    replay_chunks,
    stream_chunks,
)
from edge_vlm.server.body import header_flag, read_json
from edge_vlm.server.cache import CachedAnswer, cache_key, is_deterministic
from edge_vlm.server.errors import ClientGone
from edge_vlm.server.limits import check_limits, note_fields, parse_body
from edge_vlm.server.media import read_images
from edge_vlm.server.models import ModelSpec

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from edge_vlm.schema import ChatCompletionChunk
    from edge_vlm.server.app import RequestContext, ServerApp


async def chat_completions(app: ServerApp, request: Request, ctx: RequestContext,
                           model_id: str | None = None) -> Response:
    """``POST /v1/chat/completions`` and ``POST /models/{model_id}/v1/chat/completions``."""
    body = await read_json(request, app.settings.server)
    req = parse_body(body, model_id)
    note_fields(app, body)
    if req.stream:
        items = await open_stream(app, request, ctx, req)
        return EventStream(chat_events(items.chunks), items.headers, items.before_end)
    reply, cache = await complete(app, request, ctx, req)
    return JSONResponse(completion_body(reply), headers={"x-cache": cache})


async def responses(app: ServerApp, request: Request, ctx: RequestContext) -> Response:
    """``POST /v1/responses``: OpenAI's Responses API, stateless."""
    from edge_vlm.server import responses_api

    body = await read_json(request, app.settings.server)
    req = responses_api.to_chat_request(body)
    note_fields(app, body, responses_api.KNOWN_FIELDS, where="responses")
    if req.stream:
        items = await open_stream(app, request, ctx, req)
        return EventStream(responses_api.events(items.chunks, body), items.headers,
                           items.before_end)
    reply, cache = await complete(app, request, ctx, req)
    return JSONResponse(responses_api.response_object(reply, body),
                        headers={"x-cache": cache})


async def text_generation(app: ServerApp, request: Request, ctx: RequestContext,
                          model_id: str) -> Response:
    """``POST /models/{model_id}``: the Hugging Face text-generation form,
    ``{"inputs": "![](url)question", "parameters": {...}}`` → ``[{"generated_text": ...}]``."""
    body = await read_json(request, app.settings.server)
    req, full_text = hfraw.to_chat_request(body, model_id, app.note_field)
    reply, cache = await complete(app, request, ctx, req)
    text = reply.choices[0].message.content or ""
    if full_text:
        text = str(body["inputs"]) + text
    return JSONResponse([{"generated_text": text}], headers={"x-cache": cache})


# -- running a request --------------------------------------------------------------------


class _Prepared:
    """A request ready for its model: checked, images read, cache looked up."""

    def __init__(self, req: ChatCompletionRequest, image_data: list[bytes], spec: ModelSpec,
                 cancel: Any, watch: Watch, deadline: float, key: str | None,
                 cached: CachedAnswer | None) -> None:
        self.req, self.image_data, self.spec = req, image_data, spec
        self.cancel, self.watch = cancel, watch
        self.deadline, self.key, self.cached = deadline, key, cached


async def _prepare(app: ServerApp, request: Request, ctx: RequestContext,
                   req: ChatCompletionRequest) -> _Prepared:
    import threading

    srv = app.settings.server
    deadline = time.monotonic() + srv.request_timeout_s
    check_limits(req, srv)
    if req.token_limit is None:
        limit = min(app.settings.sampling.max_tokens, srv.max_tokens_limit)
        req = req.model_copy(update={"max_tokens": limit})
    spec = app.models.resolve(req.model)
    ctx.outcome.model = spec.name
    cancel = threading.Event()
    watch = Watch(request, cancel, deadline).start()
    try:
        loop = asyncio.get_running_loop()
        read = await loop.run_in_executor(
            app.executor, functools.partial(read_images, req, app.image_policy))
        if cancel.is_set():
            raise watch.stopped_error(srv.request_timeout_s)  # left during the image fetch
        key = None
        # Answers with logprobs are not kept: the cache keeps text and timings only.
        if app.cache.enabled and is_deterministic(req, app.settings.sampling) \
                and not req.logprobs:
            fingerprint = await loop.run_in_executor(app.executor, spec.fingerprint)
            key = cache_key(req, read.identities, fingerprint)
        use_cache = header_flag(request, "x-use-cache", True)
        cached = app.cache.get(key) if key is not None and use_cache else None
        ctx.outcome.cache = "miss" if cached is None else "hit"
        return _Prepared(req, read.data, spec, cancel, watch, deadline, key, cached)
    except BaseException:
        watch.stop()
        raise


async def _job(app: ServerApp, request: Request, p: _Prepared) -> Job:
    job = Job(app.models, p.spec, p.req, p.image_data, app.image_policy, p.cancel,
              wait=header_flag(request, "x-wait-for-model", False), deadline=p.deadline)
    await job.start(app.executor)
    return job


def _store(app: ServerApp, key: str | None) -> Any:
    return None if key is None else functools.partial(app.cache.put, key)


async def complete(app: ServerApp, request: Request, ctx: RequestContext,
                   req: ChatCompletionRequest) -> tuple[ChatCompletion, str]:
    """The whole answer to a request, and ``hit``/``miss`` for the response cache.

    Raises:
        EdgeVLMError: the request cannot be answered (status from the error).
        ClientGone: the client left.
    """
    p = await _prepare(app, request, ctx, req)
    try:
        if p.cached is not None:
            ctx.outcome.note(p.cached.timings, p.cached.finish_reason, replayed=True)
            answer = p.cached
            return ChatCompletion(
                id=new_completion_id(), created=now(), model=answer.model,
                choices=[Choice(message=AssistantMessage(content=answer.text),
                                finish_reason=answer.finish_reason)],
                usage=answer.usage, timings=answer.timings), "hit"
        with app.tracked(p.cancel):
            reply = await (await _job(app, request, p)).reply()
        finish = reply.choices[0].finish_reason
        ctx.outcome.note(reply.timings, finish)
        if finish == "cancelled":
            raise p.watch.stopped_error(app.settings.server.request_timeout_s)
        if p.key is not None and finish in ("stop", "length") and reply.timings is not None:
            app.cache.put(p.key, CachedAnswer(reply.model, (reply.choices[0].message.content
                                                            or "",), finish, reply.timings))
        return reply, "miss"
    finally:
        p.watch.stop()


class OpenStream:
    """A stream that started: its items, response headers, and what to do at its end."""

    def __init__(self, chunks: AsyncIterator[ChatCompletionChunk | EdgeVLMError],
                 headers: dict[str, str], before_end: Any) -> None:
        self.chunks, self.headers, self.before_end = chunks, headers, before_end


async def open_stream(app: ServerApp, request: Request, ctx: RequestContext,
                      req: ChatCompletionRequest) -> OpenStream:
    """Start a streamed answer; errors before the first token are raised (an HTTP status).

    Raises:
        EdgeVLMError: the request cannot be answered.
        ClientGone: the client left.
    """
    p = await _prepare(app, request, ctx, req)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if p.cached is not None:
        ctx.outcome.note(p.cached.timings, p.cached.finish_reason, replayed=True)
        p.watch.stop()
        return OpenStream(replay_chunks(p.cached, include_usage), {"x-cache": "hit"}, None)
    try:
        with app.tracked(p.cancel):
            job = await _job(app, request, p)
            head = await job.head()
        if not head:
            raise EdgeVLMError("the model produced no output")
        last = head[-1].choices[0] if head[-1].choices else None
        if last is not None and last.finish_reason == "cancelled":
            ctx.outcome.note(head[-1].timings, "cancelled")
            raise p.watch.stopped_error(app.settings.server.request_timeout_s)
    except BaseException:
        p.watch.stop()
        p.cancel.set()
        raise

    async def tracked() -> AsyncIterator[ChatCompletionChunk | EdgeVLMError]:
        with app.tracked(p.cancel):
            async for item in stream_chunks(job, head, p.watch, ctx.outcome,
                                            app.settings.server.request_timeout_s,
                                            _store(app, p.key)):
                yield item
        if p.watch.client_gone:
            ctx.gone = True

    return OpenStream(tracked(), {"x-cache": "miss"}, p.watch.stop)


# -- models and health --------------------------------------------------------------------


async def list_models(app: ServerApp, request: Request, ctx: RequestContext) -> Response:
    """``GET /v1/models``: installed models in OpenAI's list format, marking the loaded."""
    loop = asyncio.get_running_loop()
    items = await loop.run_in_executor(app.executor, _model_objects, app)
    return JSONResponse({"object": "list", "data": items})


async def get_model(app: ServerApp, request: Request, ctx: RequestContext,
                    model_id: str) -> Response:
    """``GET /v1/models/{model_id}``."""
    spec = app.models.resolve(model_id)
    loop = asyncio.get_running_loop()
    for item in await loop.run_in_executor(app.executor, _model_objects, app):
        if item["id"] == spec.name:
            return JSONResponse(item)
    return JSONResponse(_model_object(spec, None))


def _model_objects(app: ServerApp) -> list[dict[str, Any]]:
    states = {s.name: s.state for s in app.models.status()}
    specs: dict[str, ModelSpec] = {}
    try:
        default = app.models.default_spec()
        specs[default.name] = default
    except ModelNotFoundError:
        default = None
    try:
        installed = app.models.installed()
    except (OSError, EdgeVLMError):  # an unreadable store lists only the default
        installed = []
    for spec in installed:
        specs.setdefault(spec.name, spec)
    items = [_model_object(spec, states.get(name)) for name, spec in specs.items()]
    if default is not None:
        items[0]["default"] = True
    return items


def _model_object(spec: ModelSpec, state: str | None) -> dict[str, Any]:
    try:
        created = int(spec.model_path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": spec.name, "object": "model", "created": created, "owned_by": "edge-vlm",
            "loaded": state == "ready", "state": state or "available"}


async def health(app: ServerApp, request: Request, ctx: RequestContext) -> Response:
    """``GET /health``: 200 when a model is ready (or none was asked for yet), 503 with
    ``Retry-After`` while one loads, 500 when loading failed."""
    statuses = app.models.status()
    models = [{"name": s.name, "state": s.state} for s in statuses]
    loading = [s for s in statuses if s.state == "loading"]
    ready = [s for s in statuses if s.state == "ready"]
    if statuses and not ready and not loading:
        return JSONResponse({"status": "error", "models": models,
                             "message": "no model could be loaded; see the server's log"},
                            status_code=500)
    if loading and not ready:
        est = max(s.estimated_time or 1.0 for s in loading)
        return JSONResponse({"status": "loading", "estimated_time": round(est, 1),
                             "models": models}, status_code=503,
                            headers={"Retry-After": str(max(1, round(est)))})
    return JSONResponse({"status": "ok", "models": models})


__all__ = ["ClientGone", "chat_completions", "complete", "get_model", "health",
           "list_models", "open_stream", "responses", "text_generation"]
