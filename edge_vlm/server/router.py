"""A small router: method and path pattern to handler, with path parameters."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from edge_vlm.server.errors import MethodNotAllowedError, RouteNotFoundError

Handler = Callable[..., None]


@dataclass(frozen=True)
class Route:
    """One endpoint.

    Attributes:
        method: ``GET``, ``POST``, ...
        pattern: The full-path regular expression; named groups become keyword arguments.
        handler: Called as ``handler(app, exchange, record, **params)``.
        auth: Whether the Bearer token is required.
    """

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: bool = True


class Router:
    """Matches a request to a :class:`Route`."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: Handler, *, auth: bool = True) -> None:
        """Add an endpoint; ``pattern`` is a regular expression over the whole path."""
        self.routes.append(Route(method, re.compile(pattern), handler, auth))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, Any]]:
        """The route for a request and its (URL-decoded) path parameters.

        Raises:
            RouteNotFoundError: no route has this path.
            MethodNotAllowedError: routes have this path, not with this method.
        """
        allowed: list[str] = []
        for route in self.routes:
            found = route.pattern.fullmatch(path)
            if found is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {k: unquote(v) for k, v in found.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            methods = ", ".join(sorted({*allowed, "OPTIONS"}))
            raise MethodNotAllowedError(
                f"{method} is not allowed on {path}; use {methods}",
                headers={"Allow": methods})
        raise RouteNotFoundError(
            f"no endpoint at {path[:200]!r}; this server answers POST /v1/chat/completions, "
            "POST /models/{model}/v1/chat/completions, GET /v1/models and GET /health")
