"""Who may talk to the server: the Bearer token, the ``Host`` check and CORS origins.

- On loopback without a configured token, auth is off (the startup line says so).
- Any other bind address needs a token, else the server refuses to start.
- The token comes from ``--token`` / settings / env, or is generated once and stored in a
  file only its owner can read; it is compared in constant time.
- A request whose ``Host`` is not the bound address, localhost or a configured name is
  refused: a web page on a DNS name that re-resolves to 127.0.0.1 (DNS rebinding,
  Ollama CVE-2024-28224) sends its own name as ``Host``, never an address.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from edge_vlm.config import ServerSettings, config_dir
from edge_vlm.errors import ConfigError
from edge_vlm.server.errors import AuthError, ForbiddenError

TOKEN_FILE_NAME = "server-token"
_WILDCARDS = {"0.0.0.0", "::", ""}


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    text = host.strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AuthConfig:
    """The effective authentication of a running server.

    Attributes:
        token: The token clients must send, or None when auth is off.
        source: Where it came from, for the startup line (``--token``, a file, ...).
    """

    token: str | None
    source: str

    @property
    def enabled(self) -> bool:
        """Whether requests need a token."""
        return self.token is not None

    def describe(self) -> str:
        """The auth state in a few words, for the startup line."""
        if self.token is None:
            return "auth off (loopback only, no token configured)"
        return f"auth on (Bearer token from {self.source})"


def token_path(settings: ServerSettings) -> Path:
    """The file holding the generated token."""
    if settings.token_file:
        return Path(settings.token_file).expanduser()
    return config_dir() / TOKEN_FILE_NAME


def resolve_auth(settings: ServerSettings, *, token_source: str = "settings") -> AuthConfig:
    """Decide the server's authentication from its settings.

    Args:
        settings: The server settings (``token`` already merged from flags and env).
        token_source: Where ``settings.token`` came from, for the startup line.

    Raises:
        ConfigError: a non-loopback bind without any token, or an unsafe token file.
    """
    if settings.token:
        if len(settings.token) < 8:
            raise ConfigError("the server token is shorter than 8 characters; use a long "
                              "random one (or --auth to generate one)")
        return AuthConfig(settings.token, token_source)
    path = token_path(settings)
    if settings.require_token:
        return AuthConfig(load_or_create_token(path), str(path))
    if not is_loopback(settings.host):
        raise ConfigError(
            f"binding {settings.host!r} makes the server reachable from other machines, so "
            "it needs a token: pass --token TOKEN (or set EDGE_VLM_SERVER__TOKEN), or pass "
            f"--auth to generate one and store it in {path}")
    return AuthConfig(None, "")


def load_or_create_token(path: Path) -> str:
    """Read the stored token, creating it (owner-only permissions) on first use.

    Raises:
        ConfigError: the file is readable by others, empty, or cannot be written.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return _create_token(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the server token file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"the server token file {path} is readable by other users "
                f"(mode {stat.S_IMODE(info.st_mode):o}); run chmod 600 {path} or delete it "
                "to have a new one generated")
        token = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    if not token:
        raise ConfigError(f"the server token file {path} is empty; delete it to have a new "
                          "one generated")
    return token


def _create_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another server created it meanwhile
        return load_or_create_token(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the server token file {path}: {exc.strerror}; "
                          "set server.token_file to a writable place") from None
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    return token


def check_bearer(auth: AuthConfig, header: str) -> None:
    """Check an ``Authorization`` header.

    Raises:
        AuthError: missing, not Bearer, or not the token.
    """
    if auth.token is None:
        return
    if not header:
        raise AuthError("this server needs a token: send the header "
                        "'Authorization: Bearer <token>' (api_key= in the OpenAI and HF clients)")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthError(f"the Authorization header must be 'Bearer <token>', not {scheme!r}")
    if not hmac.compare_digest(given.strip().encode(), auth.token.encode()):
        raise AuthError("the token is not this server's token; check --token or the "
                        "server's token file")


def split_host(value: str) -> str:
    """The host part of a ``Host`` header, without port or IPv6 brackets, lowercased."""
    text = value.strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text[1:]
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


def check_host(header: str, bound_host: str, extra_names: list[str]) -> None:
    """Refuse a ``Host`` header that is not this server (DNS rebinding).

    Raises:
        ForbiddenError: naming the refused host and the setting that would accept it.
    """
    host = split_host(header)
    if host_allowed(host, bound_host, extra_names):
        return
    shown = header[:100]
    raise ForbiddenError(
        f"Host header {shown!r} is not this server's address; use http://localhost or the "
        "bound address, or add the name to server.allowed_host_names")


def host_allowed(host: str, bound_host: str, extra_names: list[str]) -> bool:
    """Whether a ``Host`` (without port) names this server."""
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    bound = bound_host.strip().strip("[]").lower()
    if host == bound or host in {n.strip().lower().rstrip(".") for n in extra_names}:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name nobody configured
    if address.is_loopback:
        return True
    # An address can't be rebound. Bound to all interfaces, any of ours may be used.
    if bound in _WILDCARDS:
        return True
    try:
        return address == ipaddress.ip_address(bound)
    except ValueError:
        return False


def check_origin(origin: str, allowed: list[str]) -> bool:
    """Whether a request's ``Origin`` may use the API (CORS).

    Returns:
        True when the origin is allowed (CORS headers are then added).

    Raises:
        ForbiddenError: a browser page from an origin that is not configured.
    """
    if not origin:
        return False
    if "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}:
        return True
    raise ForbiddenError(
        f"cross-origin requests from {origin[:100]!r} are refused; add the origin to "
        "server.cors_origins to allow a web page to use this server")
