"""The ASGI application: :func:`create_app` builds it, uvicorn or a parent app serves it.

Every request goes through :meth:`ServerApp.__call__`: the ``Host`` check (DNS rebinding),
the ``Origin`` check (CORS, preflights answered here), then Starlette's router, whose
endpoints (:mod:`.handlers`) check the Bearer token. Errors are converted once, to the
OpenAI error shape (:func:`error_response`); one log line per request follows.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from edge_vlm.config import Settings
from edge_vlm.errors import EdgeVLMError, ModelNotFoundError, RequestError
from edge_vlm.server import handlers
from edge_vlm.server.answer import Outcome
from edge_vlm.server.auth import (
    AuthConfig,
    check_bearer,
    check_host,
    check_origin,
    resolve_auth,
)
from edge_vlm.server.cache import ResponseCache
from edge_vlm.server.errors import (
    BadRequestError,
    ClientGone,
    ForbiddenError,
    HeadersTooLargeError,
    HTTPError,
    MethodNotAllowedError,
    RouteNotFoundError,
    error_body,
    header_safe,
)
from edge_vlm.server.media import server_image_policy
from edge_vlm.server.models import Loader, ModelManager

log = logging.getLogger("edge_vlm.server")

#: The most bytes of request headers accepted (h11 caps what it buffers while waiting; a
#: request arriving whole is checked here).
MAX_HEADER_BYTES = 32 * 1024
#: Status recorded for a client that left before its answer (nginx's convention).
CLIENT_CLOSED = 499
_EXPOSED = "x-cache, x-request-id, retry-after, x-error-message"
_ROUTES_TEXT = ("POST /v1/chat/completions, POST /v1/responses, "
                "POST /models/{model}/v1/chat/completions, POST /models/{model}, "
                "GET /v1/models and GET /health")


@dataclass
class RequestRecord:
    """One served request, as logged."""

    method: str
    path: str
    status: int
    outcome: Outcome
    total_ms: float
    error: str | None = None
    request_id: str = ""

    def line(self) -> str:
        """The log line: method, path, status, model, tokens, images, TTFT, time, cache."""
        o = self.outcome

        def num(v: float | None, unit: str = "") -> str:
            return "-" if v is None else f"{v:.0f}{unit}"

        # Each image as detail/tiles/tokens (``images=low/1t/64tok``): what it cost.
        images = ",".join(f"{im.detail}/{im.tiles}t/{im.tokens}tok"
                          for im in (o.timings.images if o.timings else []))
        return (f"{self.method} {self.path} {self.status} model={o.model} "
                f"prompt_tokens={num(o.prompt_tokens)} "
                f"completion_tokens={num(o.completion_tokens)} "
                + (f"images={images} " if images else "")
                + f"ttft={num(o.ttft_ms, 'ms')} total={self.total_ms:.0f}ms cache={o.cache}"
                + (f" finish={o.finish_reason}" if o.finish_reason else "")
                + f" id={self.request_id}"
                + (f" error={self.error!r}" if self.error else ""))


@dataclass
class RequestContext:
    """One request in flight: what its log line needs, and headers added to its response."""

    method: str
    path: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    outcome: Outcome = field(default_factory=Outcome)
    status: int | None = None
    gone: bool = False
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def context(request: Request) -> RequestContext:
    """The :class:`RequestContext` of a request inside :class:`ServerApp`."""
    ctx: RequestContext = request.scope["state"]["edge_vlm"]
    return ctx


def status_of(err: EdgeVLMError) -> int:
    """The HTTP status of an error: the client's faults are 4xx (bad request 400, too large
    413, unsupported image 415, model missing 404), the server's own errors say theirs
    (401, 403, 503 ...), and anything else of the runtime's is a 500."""
    if isinstance(err, HTTPError | RequestError | ModelNotFoundError):
        return err.http_status
    return 500


def error_response(err: EdgeVLMError, ctx: RequestContext | None = None) -> Response:
    """An error in the OpenAI shape, with the status the error names.

    A 500 is the runtime's own fault: it is logged with the request id, which the
    message names (and the ``x-request-id`` header carries).
    """
    headers = dict(err.headers) if isinstance(err, HTTPError) else {}
    status = status_of(err)
    body = error_body(err)
    if status == 500 and ctx is not None:
        log.error("internal error in %s %s (request id %s): %s", ctx.method, ctx.path,
                  ctx.request_id, err.message, exc_info=err)
        body["error"]["message"] = f"{err.message} (request id {ctx.request_id})"
    # Hugging Face clients show this header's text as the error message.
    headers["X-Error-Message"] = header_safe(body["error"]["message"])
    if ctx is not None:
        ctx.error = err.message
    return JSONResponse(body, status_code=status, headers=headers)


def internal_error(exc: BaseException, ctx: RequestContext) -> Response:
    """A bug: logged with its traceback and the request id, 500 naming the id."""
    err = EdgeVLMError(f"internal error ({type(exc).__name__}) while answering; the "
                       "server's log has the details")
    err.__cause__ = exc
    return error_response(err, ctx)


Endpoint = Callable[..., Awaitable[Response]]


class ServerApp:
    """edge-vlm's HTTP API as an ASGI application, and the state behind it.

    Args:
        settings: All settings (``server`` and ``images`` sections apply here).
        auth: The effective authentication (default: from the settings, see
            :func:`~edge_vlm.server.auth.resolve_auth`).
        loader: Loads a model (default: :func:`edge_vlm.api.load`); tests gate it.
    """

    def __init__(self, settings: Settings, auth: AuthConfig | None = None, *,
                 loader: Loader | None = None) -> None:
        self.settings = settings
        self.auth = auth if auth is not None else resolve_auth(settings.server)
        self.models = ModelManager(settings, loader)
        self.cache = ResponseCache(settings.server.response_cache_entries)
        self.image_policy = server_image_policy(settings)
        self.records: deque[RequestRecord] = deque(maxlen=1000)
        """The latest requests served (newest last)."""
        self.bound_host = settings.server.host
        srv = settings.server
        # Threads for the blocking steps before generation: reading images (files, URLs),
        # fingerprinting model files, taking a place in a model's queue (which waits when
        # the model loads: x-wait-for-model). The generation itself runs on the model's
        # own worker thread (models.ModelWorker). Bounded by what the queues admit, plus
        # room for the requests they refuse.
        workers = srv.max_loaded_models * (srv.queue_size + 1) + 8
        self.executor = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="edge-vlm-queue")
        _start_all_threads(self.executor, workers)
        self.noted_fields: set[str] = set()
        """Request fields already logged as unknown or not acted on (logged once each)."""
        self._active: set[threading.Event] = set()
        self._lock = threading.Lock()
        self._router = Starlette(routes=self._routes(), exception_handlers={
            HTTPException: self._http_exception})

    def _routes(self) -> list[Route]:
        def ep(fn: Endpoint, *, auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                ctx = context(request)
                try:
                    if auth:
                        check_bearer(self.auth, request.headers.get("authorization", ""))
                    return await fn(self, request, ctx, **request.path_params)
                except ClientGone:
                    ctx.gone = True
                    return Response(status_code=400, headers={"Connection": "close"})
                except EdgeVLMError as err:
                    return error_response(err, ctx)
                except Exception as exc:
                    return internal_error(exc, ctx)
            return endpoint

        chat = ep(handlers.chat_completions)
        return [
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/chat/completions", chat, methods=["POST"]),
            Route("/models/{model_id:path}/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", ep(handlers.responses), methods=["POST"]),
            Route("/models/{model_id:path}", ep(handlers.text_generation), methods=["POST"]),
            Route("/v1/models", ep(handlers.list_models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", ep(handlers.get_model), methods=["GET"]),
            Route("/health", ep(handlers.health, auth=False), methods=["GET"]),
        ]

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        """Starlette's 404 and 405, in the OpenAI error shape."""
        assert isinstance(exc, HTTPException)
        ctx = context(request)
        path = request.url.path[:200]
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            methods = ", ".join(sorted({*allow.split(", "), "OPTIONS"} - {""}))
            return error_response(MethodNotAllowedError(
                f"{request.method} is not allowed on {path}; use {methods}",
                headers={"Allow": methods}), ctx)
        return error_response(RouteNotFoundError(
            f"no endpoint at {path!r}; this server answers {_ROUTES_TEXT}"), ctx)

    # -- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        ctx = RequestContext(scope["method"], scope["path"], "req-" + uuid.uuid4().hex[:16])
        ctx.headers["x-request-id"] = ctx.request_id
        scope.setdefault("state", {})["edge_vlm"] = ctx

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                message = {**message, "headers": [
                    *message.get("headers", []),
                    *((k.lower().encode("latin-1"), v.encode("latin-1"))
                      for k, v in ctx.headers.items())]}
            try:
                await send(message)
            except Exception:
                # The connection cannot take a response any more: h11 already answered a
                # malformed request with 400 and is closing it, or the client left.
                log.debug("response to %s not sent", ctx.request_id, exc_info=True)
                ctx.gone = True

        try:
            response = self._guard(Headers(scope=scope), scope["method"], ctx)
            if response is not None:
                await response(scope, receive, send_with_headers)
            else:
                await self._router(scope, receive, send_with_headers)
        except Exception as exc:  # a bug below the endpoints: still an answer and a log
            if ctx.status is None:
                await internal_error(exc, ctx)(scope, receive, send_with_headers)
            else:
                log.error("error after the response started (request id %s)",
                          ctx.request_id, exc_info=exc)
        finally:
            self._record(ctx)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _record(self, ctx: RequestContext) -> None:
        status = CLIENT_CLOSED if ctx.gone else (ctx.status or 0)
        record = RequestRecord(ctx.method, ctx.path, status, ctx.outcome,
                               (time.perf_counter() - ctx.started) * 1000.0,
                               ctx.error or ctx.outcome.error, ctx.request_id)
        self.records.append(record)
        log.info("%s", record.line())

    def _guard(self, headers: Headers, method: str, ctx: RequestContext) -> Response | None:
        """Host and Origin checks before anything else; the answer to a CORS preflight."""
        srv = self.settings.server
        try:
            size = sum(len(k) + len(v) for k, v in headers.raw)
            if size > MAX_HEADER_BYTES:
                raise HeadersTooLargeError(
                    f"the request headers are {size} bytes, over the {MAX_HEADER_BYTES}-byte "
                    "limit", headers={"Connection": "close"})
            hosts = headers.getlist("host")
            if len(hosts) > 1:
                raise BadRequestError("the request has more than one Host header; send one",
                                      headers={"Connection": "close"})
            host = hosts[0] if hosts else ""
            if not host:
                raise ForbiddenError("the request has no Host header; send one (HTTP/1.1)")
            check_host(host, self.bound_host, srv.allowed_host_names)
            origin = headers.get("origin", "")
            allowed = check_origin(origin, srv.cors_origins)
        except EdgeVLMError as err:
            return error_response(err, ctx)
        if allowed:
            ctx.headers.update({"Access-Control-Allow-Origin": origin,
                                "Access-Control-Expose-Headers": _EXPOSED, "Vary": "Origin"})
        if method != "OPTIONS":
            return None
        cors: dict[str, str] = {}
        if allowed:
            # Reflect what the page asks to send: the OpenAI JS SDK adds its own
            # ``x-stainless-*`` headers; the origin is trusted already.
            requested = headers.get("access-control-request-headers", "")
            cors = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": header_safe(requested, 2000)
                    or "authorization, content-type",
                    "Access-Control-Max-Age": "600"}
            ctx.headers["Vary"] = ("Origin, Access-Control-Request-Method, "
                                   "Access-Control-Request-Headers")
        return Response(status_code=204, headers={"Allow": "GET, POST, OPTIONS", **cors})

    # -- state -------------------------------------------------------------------------

    @contextlib.contextmanager
    def tracked(self, cancel: threading.Event) -> Iterator[threading.Event]:
        """Register a request's cancel flag, set by :meth:`close` at shutdown."""
        with self._lock:
            self._active.add(cancel)
        try:
            yield cancel
        finally:
            with self._lock:
                self._active.discard(cancel)

    def note_field(self, name: str, message: str) -> None:
        """Log ``message`` the first time a request field ``name`` is seen."""
        with self._lock:
            if name in self.noted_fields:
                return
            self.noted_fields.add(name)
        log.warning("%s", message)

    def close(self, timeout: float = 10.0) -> None:
        """Stop running generations and unload the models."""
        with self._lock:
            for cancel in self._active:
                cancel.set()
        self.models.close(timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)


def _start_all_threads(executor: ThreadPoolExecutor, workers: int) -> None:
    """Start the pool's threads now, so their number never changes while serving (a
    thread count that grows is then a leak; see benchmarks/server_soak.py)."""
    barrier = threading.Barrier(workers)
    for _ in range(workers):
        executor.submit(barrier.wait, 10.0)


def create_app(settings: Settings, *, auth: AuthConfig | None = None,
               loader: Loader | None = None) -> ServerApp:
    """edge-vlm's API as an ASGI app, to serve with uvicorn or mount in your own app.

    ```python
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from edge_vlm.config import load_settings
    from edge_vlm.server import create_app

    app = Starlette(routes=[Mount("/vlm", create_app(load_settings()))])
    ```

    With ``server.preload`` the default model starts loading now, in the background.

    Args:
        settings: All settings.
        auth: The authentication (default: from ``settings.server``).
        loader: Loads a model (default: :func:`edge_vlm.api.load`).

    Raises:
        ConfigError: a non-loopback host without a token.
        ModelNotFoundError: the default model is missing (when preloading).
    """
    app = ServerApp(settings, auth, loader=loader)
    if settings.server.preload:
        app.models.start(app.models.default_spec())
    return app


__all__ = ["RequestRecord", "ServerApp", "create_app", "error_response"]
