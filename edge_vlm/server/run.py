"""Start the server from the command line, print the startup line, stop it cleanly."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from edge_vlm.config import load_settings
from edge_vlm.errors import ConfigError
from edge_vlm.server.app import create_server, startup_line
from edge_vlm.server.auth import resolve_auth


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
        server.shutdown()
        server.app.close()
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
