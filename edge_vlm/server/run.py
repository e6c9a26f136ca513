"""``edge-vlm serve``: the ASGI app on uvicorn (h11), bound, started, stopped cleanly.

uvicorn's bounds on what one client can hold: ``limit_concurrency`` (connections and
requests at once; beyond it, 503), ``timeout_keep_alive`` (idle connections), h11's
header size cap; :mod:`.protocol` adds the time limit on request headers that uvicorn
lacks, and :mod:`.body` the one on the body.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

import uvicorn

from edge_vlm import __version__
from edge_vlm.config import Settings, load_settings
from edge_vlm.errors import ConfigError, EdgeVLMError
from edge_vlm.server.app import MAX_HEADER_BYTES, ServerApp
from edge_vlm.server.auth import AuthConfig, resolve_auth
from edge_vlm.server.models import Loader
from edge_vlm.server.protocol import HeaderTimeoutH11Protocol


def uvicorn_config(app: ServerApp) -> uvicorn.Config:
    """uvicorn's configuration for ``app``, with the server settings' limits."""
    srv = app.settings.server
    config = uvicorn.Config(
        app, http=HeaderTimeoutH11Protocol, loop="asyncio", lifespan="off", ws="none",
        interface="asgi3", log_config=None, access_log=False, server_header=False,
        headers=[("server", f"edge-vlm/{__version__}")], date_header=True,
        limit_concurrency=srv.max_connections, timeout_keep_alive=int(max(1, srv.keep_alive_s)),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, backlog=512,
        timeout_graceful_shutdown=5)
    config.header_timeout_s = srv.read_timeout_s  # type: ignore[attr-defined]
    return config


class EdgeServer:
    """The app served by uvicorn in a thread, on a socket bound at creation.

    Args:
        app: The application.
    """

    def __init__(self, app: ServerApp) -> None:
        self.app = app
        host = app.settings.server.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, app.settings.server.port))
            sock.listen(512)  # connections wait in the kernel until uvicorn starts
        except BaseException:
            sock.close()
            raise
        sock.set_inheritable(True)
        self.socket = sock
        self.address_family = family
        self._server = uvicorn.Server(uvicorn_config(app))
        self._done = threading.Event()

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self.socket.getsockname()[1])

    def url(self) -> str:
        """The base URL clients use (``http://host:port``)."""
        host = self.app.settings.server.host.strip("[]")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if self.address_family == socket.AF_INET else "::1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (in the calling thread)."""
        try:
            asyncio.run(self._server.serve(sockets=[self.socket]))
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running responses end (uvicorn's graceful shutdown)."""
        self._server.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()


def create_server(settings: Settings, auth: AuthConfig, *,
                  loader: Loader | None = None) -> EdgeServer:
    """Bind the server (it does not serve until ``serve_forever``) and preload the model.

    Raises:
        OSError: the address cannot be bound.
        ModelNotFoundError: the default model is missing (when preloading).
    """
    app = ServerApp(settings, auth, loader=loader)
    server = EdgeServer(app)
    if settings.server.preload:
        try:
            app.models.start(app.models.default_spec())
        except BaseException:
            server.server_close()
            raise
    return server


def startup_line(server: EdgeServer) -> str:
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


def serve(overrides: dict[str, Any], *, token_source: str = "settings") -> int:
    """Run ``edge-vlm serve`` until interrupted.

    Args:
        overrides: Settings from the command-line flags (dotted keys).
        token_source: Where ``server.token`` came from, for the startup line.

    Returns:
        The exit code (0 after Ctrl-C or SIGTERM).

    Raises:
        ConfigError: a non-loopback address without a token, or the port is taken.
        ModelNotFoundError: the default model is missing.
    """
    settings = load_settings(overrides)
    auth = resolve_auth(settings.server, token_source=token_source)
    _setup_logging()
    try:
        server = create_server(settings, auth)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror}; "
            "choose another --port (0 picks a free one) or stop the other server") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Both set explicitly: a server started in the background (``edge-vlm serve &``) has
    # SIGINT ignored by the shell, and ``kill -INT`` should still stop it cleanly.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, name="edge-vlm-serve", daemon=True)
    thread.start()
    print(startup_line(server), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("edge-vlm serve: stopping", file=sys.stderr, flush=True)
        server.app.close()
        server.shutdown()
        server.server_close()
    return 0


def _setup_logging() -> None:
    logger = logging.getLogger("edge_vlm.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


__all__ = ["EdgeServer", "create_server", "serve", "startup_line", "uvicorn_config"]
