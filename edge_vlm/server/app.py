"""The HTTP server: ``ThreadingHTTPServer``, one handler per connection, the routes.

Every request goes through :meth:`ServerApp.dispatch`: the ``Host`` check (DNS rebinding),
the ``Origin`` check (CORS), the route, the Bearer token, then the endpoint. Errors are
converted once, here, to the OpenAI error shape; one log line per request follows.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_vlm import __version__
from edge_vlm.config import Settings
from edge_vlm.errors import EdgeVLMError
from edge_vlm.server import handlers
from edge_vlm.server.auth import AuthConfig, check_bearer, check_host, check_origin
from edge_vlm.server.cache import ResponseCache
from edge_vlm.server.errors import (
    BadRequestError,
    ForbiddenError,
    PayloadTooLargeError,
)
from edge_vlm.server.exchange import ClientGone, Exchange, error_body, header_safe
from edge_vlm.server.generate import Outcome
from edge_vlm.server.media import server_image_policy
from edge_vlm.server.models import Loader, ModelManager
from edge_vlm.server.router import Router

log = logging.getLogger("edge_vlm.server")

_CORS_HEADERS = "authorization, content-type, x-use-cache, x-wait-for-model"
#: Status recorded for a client that left before its answer (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class RequestRecord:
    """One served request, as logged."""

    method: str
    path: str
    status: int
    outcome: Outcome
    total_ms: float
    error: str | None = None

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
                + (f" error={self.error!r}" if self.error else ""))


def build_router() -> Router:
    """The server's endpoints."""
    r = Router()
    r.add("POST", r"/v1/chat/completions", handlers.chat_completions)
    r.add("POST", r"/chat/completions", handlers.chat_completions)
    r.add("POST", r"/models/(?P<model_id>.+?)/v1/chat/completions", handlers.chat_completions)
    r.add("GET", r"/v1/models", handlers.list_models)
    r.add("GET", r"/v1/models/(?P<model_id>.+)", handlers.get_model)
    r.add("GET", r"/health", handlers.health, auth=False)
    return r


class ServerApp:
    """The server's state: settings, auth, models, response cache, request log.

    Args:
        settings: All settings (``server`` and ``images`` sections apply here).
        auth: The effective authentication (see :func:`~edge_vlm.server.auth.resolve_auth`).
        loader: Loads a model (default: llama.cpp); tests gate it to see loading states.
    """

    def __init__(self, settings: Settings, auth: AuthConfig, *,
                 loader: Loader | None = None) -> None:
        self.settings = settings
        self.auth = auth
        self.models = ModelManager(settings, loader)
        self.cache = ResponseCache(settings.server.response_cache_entries)
        self.image_policy = server_image_policy(settings)
        self.router = build_router()
        self.records: deque[RequestRecord] = deque(maxlen=1000)
        """The latest requests served (newest last)."""
        self.bound_host = settings.server.host
        self._active: set[threading.Event] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def tracked(self) -> Iterator[threading.Event]:
        """A cancel flag for one request, set by :meth:`close` at shutdown."""
        cancel = threading.Event()
        with self._lock:
            self._active.add(cancel)
        try:
            yield cancel
        finally:
            with self._lock:
                self._active.discard(cancel)

    def close(self, timeout: float = 10.0) -> None:
        """Stop running generations and unload the models."""
        with self._lock:
            for cancel in self._active:
                cancel.set()
        self.models.close(timeout)

    # -- one request -----------------------------------------------------------------

    def dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        """Answer one request on ``handler``'s connection."""
        ex = Exchange(handler, max_body_bytes=self.settings.server.max_body_bytes)
        outcome = Outcome()
        error: str | None = None
        status: int | None = None
        try:
            self._guard(ex)
            if ex.method == "OPTIONS":
                self._preflight(ex)
                return
            route, params = self.router.match(ex.method, ex.path)
            if route.auth:
                check_bearer(self.auth, ex.header("Authorization"))
            route.handler(self, ex, outcome, **params)
        except ClientGone:
            status = CLIENT_CLOSED
            handler.close_connection = True
        except EdgeVLMError as err:
            status, error = err.http_status, err.message
            self._send_error(ex, err)
        except (BrokenPipeError, ConnectionResetError):
            status = CLIENT_CLOSED
            handler.close_connection = True
        except Exception as exc:  # a bug: answer 500 and keep serving
            log.exception("error while answering %s %s", ex.method, ex.path)
            internal = EdgeVLMError(f"internal error: {type(exc).__name__}: {exc}")
            status, error = internal.http_status, internal.message
            self._send_error(ex, internal)
        finally:
            if ex.body_unread:
                handler.close_connection = True
                ex.linger()
            record = RequestRecord(ex.method, ex.path, status or ex.status or 0, outcome,
                                   (time.perf_counter() - ex.started) * 1000.0,
                                   error or outcome.error)
            self.records.append(record)
            log.info("%s", record.line())

    def _send_error(self, ex: Exchange, err: EdgeVLMError) -> None:
        if ex.responded:
            return  # a stream already started: the error went out as an event
        with contextlib.suppress(OSError):
            ex.send_error(err)

    def _guard(self, ex: Exchange) -> None:
        """Host and Origin checks, before anything else."""
        srv = self.settings.server
        host = ex.header("Host")
        if not host:
            raise ForbiddenError("the request has no Host header; send one (HTTP/1.1)")
        check_host(host, self.bound_host, srv.allowed_host_names)
        if check_origin(ex.header("Origin"), srv.cors_origins):
            ex.extra_headers.update({
                "Access-Control-Allow-Origin": ex.header("Origin"),
                "Access-Control-Expose-Headers": "x-cache, retry-after, x-error-message",
                "Vary": "Origin",
            })

    def _preflight(self, ex: Exchange) -> None:
        ex.send_bytes(204, b"", "text/plain", {
            "Allow": "GET, POST, OPTIONS",
            **({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": _CORS_HEADERS,
                "Access-Control-Max-Age": "600"} if ex.extra_headers else {}),
        })


class RequestHandler(BaseHTTPRequestHandler):
    """The per-connection handler; everything is delegated to :class:`ServerApp`."""

    protocol_version = "HTTP/1.1"
    server_version = f"edge-vlm/{__version__}"
    server: EdgeHTTPServer

    def setup(self) -> None:
        super().setup()
        # Bounds every read: a client trickling its headers or body gets 408 or is cut.
        self.connection.settimeout(self.server.app.settings.server.read_timeout_s)
        with contextlib.suppress(OSError):
            # Each SSE event is one small write: do not let Nagle hold it back.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        """The ``Server`` header: edge-vlm's version only."""
        return self.server_version

    def _dispatch(self) -> None:
        self.server.app.dispatch(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _dispatch

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        limit = self.server.app.settings.server.max_body_bytes
        declared = self.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            ex = Exchange(self, max_body_bytes=limit)
            ex.send_error(PayloadTooLargeError(
                f"the request body is {declared} bytes, over the {limit}-byte limit "
                "(server.max_body_bytes)"))
            self.close_connection = True
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, headers too large) as OpenAI JSON."""
        err = BadRequestError(f"HTTP {code}: {message or explain or 'bad request'}")
        err.http_status = code
        body = error_body(err)
        data = _json_bytes(body)
        with contextlib.suppress(OSError):
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Error-Message", header_safe(err.message))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: :meth:`ServerApp.dispatch` logs one line per request."""


def _json_bytes(body: Any) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":")).encode()


class EdgeHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server bound to the settings' host and port.

    Args:
        app: The application state.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # 20+ clients connecting at once must not be dropped

    def __init__(self, app: ServerApp) -> None:
        self.app = app
        host = app.settings.server.host
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), app.settings.server.port), RequestHandler)

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS lookup (it can hang offline)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self.server_address[1])

    def url(self) -> str:
        """The base URL clients use (``http://host:port``)."""
        host = self.app.settings.server.host.strip("[]")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if self.address_family == socket.AF_INET else "::1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connection-level failures (a client resetting) are not worth a traceback."""
        log.debug("connection error from %s", client_address, exc_info=True)


def create_server(settings: Settings, auth: AuthConfig, *,
                  loader: Loader | None = None) -> EdgeHTTPServer:
    """Bind the server (it does not serve until ``serve_forever``) and preload the model.

    Raises:
        OSError: the address cannot be bound.
        ModelNotFoundError: the default model is missing (when preloading).
    """
    app = ServerApp(settings, auth, loader=loader)
    server = EdgeHTTPServer(app)
    if settings.server.preload:
        try:
            app.models.start(app.models.default_spec())
        except BaseException:
            server.server_close()
            raise
    return server


def startup_line(server: EdgeHTTPServer) -> str:
    """The one line printed at start: the URL and the auth state."""
    app = server.app
    url = server.url()
    remote = "remote images on" if app.settings.images.allow_remote else "remote images off"
    if app.settings.images.allow_remote and app.settings.images.allowed_hosts:
        remote += f" (allowlisted: {', '.join(app.settings.images.allowed_hosts)})"
    return (f"edge-vlm serve: listening on {url} (OpenAI base_url {url}/v1); "
            f"{app.auth.describe()}; {remote}; model {_default_name(app)}")


def _default_name(app: ServerApp) -> str:
    try:
        spec = app.models.default_spec()
    except EdgeVLMError:
        return "(default model missing)"
    state = {s.name: s.state for s in app.models.status()}.get(spec.name, "loads on first use")
    return f"{spec.name} {state}"


__all__ = ["EdgeHTTPServer", "RequestRecord", "ServerApp", "create_server",
           "startup_line"]
