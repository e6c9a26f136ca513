"""Fetch an image over http(s) without letting the request reach private networks.

Used by :mod:`edge_vlm.image_source` only when remote images are switched on. Standard library
only. Every hop (the first URL and each redirect) is parsed, its host resolved once, and
every resolved address checked; the connection then goes to that checked address, so a
second DNS answer (DNS rebinding) cannot redirect it. The ``Host`` header and the TLS
server name stay the URL's host name, so virtual hosting and certificate checks still work.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from edge_vlm.errors import ImageError, ImageTooLargeError, RemoteImageDisabledError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[IPAddress]]

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_ALLOW_HINT = "add the host to images.allowed_hosts only if you trust it"


def parse_ip_host(host: str) -> IPAddress | None:
    """Read a URL host as an IP address the way the C resolver (``inet_aton``) would.

    Besides dotted quads and IPv6 literals this accepts the legacy forms that still reach
    an address: ``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``.

    Args:
        host: The host part of a URL, with or without IPv6 brackets.

    Returns:
        The address, or ``None`` when the host is a name rather than an address.
    """
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    parts = text.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_parse_ipv4_part(part) for part in parts]
    if any(number is None for number in numbers):
        return None
    *head, last = [number for number in numbers if number is not None]
    if any(number > 255 for number in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for number in head:
        value = value << 8 | number
    return ipaddress.IPv4Address(value << 8 * (4 - len(head)) | last)


def _parse_ipv4_part(part: str) -> int | None:
    """Parse one dot-separated part: ``0x`` prefix is hex, a leading ``0`` octal."""
    if part.startswith("0x"):
        digits, base = part[2:], 16
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits:
        return 0 if base == 16 else None
    if any(char not in "0123456789abcdef"[:base] for char in digits):
        return None
    return int(digits, base)


def is_public_address(ip: IPAddress) -> bool:
    """Whether an address is on the public internet.

    Loopback, private, link-local, multicast, reserved, unspecified and shared (CGNAT)
    addresses are not public, nor are IPv6 addresses embedding such an IPv4 address
    (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64).

    Args:
        ip: The address to classify.

    Returns:
        ``True`` only for globally routable unicast addresses.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not is_public_address(embedded):
            return False
    return ip.is_global and not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or int(ip) >> 32 == 0:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Resolve a host name to all of its addresses (the default resolver of :func:`fetch`)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [
        ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        for family, _, _, _, sockaddr in infos
        if family in (socket.AF_INET, socket.AF_INET6)
    ]


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    ip: IPAddress
    path: str


def _check_url(url: str, allowed_hosts: tuple[str, ...], resolve: Resolver, field: str) -> _Target:
    """Parse one hop's URL and pick the address to connect to, or refuse it."""
    shown = url if len(url) <= 200 else url[:200] + "..."
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise ImageError(f"{field}: cannot parse URL {shown!r} ({exc})", param=field) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(
            f"{field}: URL {shown!r} uses scheme {scheme!r}; only http and https can be "
            "fetched (a redirect may not switch scheme to anything else)",
            param=field,
        )
    if not host:
        raise ImageError(f"{field}: URL {shown!r} has no host", param=field)
    if parts.username is not None or parts.password is not None:
        raise ImageError(
            f"{field}: URL {shown!r} carries a user name or password; remove it", param=field
        )
    literal = parse_ip_host(host)
    trusted = _is_allowed(host, literal, allowed_hosts)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise ImageError(
                f"{field}: cannot resolve host {host!r} of {shown!r} ({exc}); "
                "check the URL or your network",
                param=field,
            ) from exc
        if not addresses:
            raise ImageError(f"{field}: host {host!r} of {shown!r} has no address", param=field)
    if not trusted:
        # All addresses must be public or allowed by address (``--allow-host 127.0.0.1``
        # covers ``localhost``): a mixed answer is how rebinding attacks look.
        allowed_ips = {ip for ip in map(parse_ip_host, allowed_hosts) if ip is not None}
        if any(ip in allowed_ips for ip in addresses):
            # Connect only to the allowed ones (``localhost`` is often ::1 and 127.0.0.1).
            addresses = [ip for ip in addresses if ip in allowed_ips]
        for ip in addresses:
            if not is_public_address(ip) and ip not in allowed_ips:
                hint = (f"allow the name with --allow-host {host} (images.allowed_hosts) "
                        "only if you trust it" if literal is None else _ALLOW_HINT)
                raise ImageHostNotAllowedError(
                    f"{field}: URL {shown!r} points to {ip}, a {_describe(ip)} address; "
                    f"remote images may only reach public addresses or allowed hosts ({hint})",
                    param=field,
                )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port, addresses[0], path)


class ImageHostNotAllowedError(RemoteImageDisabledError):
    """Remote images are on, but this URL's host is private or loopback and not allowed
    (error code ``image_host_not_allowed``)."""


def _is_allowed(host: str, literal: IPAddress | None, allowed_hosts: tuple[str, ...]) -> bool:
    name = host.lower().rstrip(".")
    for entry in allowed_hosts:
        wanted = entry.strip().lower().strip("[]").rstrip(".")
        if wanted == name or (literal is not None and parse_ip_host(wanted) == literal):
            return True
    return False


def _describe(ip: IPAddress) -> str:
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    return next((name for name, hit in checks if hit), "non-public")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a fixed, already checked address; ``host`` is only the name."""

    def __init__(self, target: _Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.target_ip = str(target.ip)
        self.pinned: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.pinned = socket.create_connection(
            (self.target_ip, self.port), self.timeout
        )


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def __init__(self, target: _Target, timeout: float) -> None:
        super().__init__(target, timeout)
        self.ssl_context = ssl.create_default_context()

    def connect(self) -> None:
        raw = socket.create_connection((self.target_ip, self.port), self.timeout)
        try:
            self.sock = self.pinned = self.ssl_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed_hosts: tuple[str, ...] = (),
    field: str = "image_url.url",
    resolve: Resolver = resolve_host,
) -> tuple[bytes, str]:
    """Download an image body, following at most :data:`MAX_REDIRECTS` redirects.

    Args:
        url: An ``http://`` or ``https://`` URL.
        max_bytes: Largest body accepted, counted while reading.
        timeout_s: Time allowed for the whole download, redirects included (name
            resolution excepted: ``getaddrinfo`` cannot be interrupted).
        allowed_hosts: Host names or addresses allowed even when not public.
        field: The request field the URL came from, named in every error.
        resolve: Resolves a host name and port to addresses; the default uses the system.

    Returns:
        The body and the final URL it came from.

    Raises:
        RemoteImageDisabledError: A hop points to a non-public address not allowed.
        ImageTooLargeError: The body is larger than ``max_bytes``.
        ImageError: Bad URL, network failure, timeout, HTTP error or too many redirects.
    """
    deadline = time.monotonic() + timeout_s
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        target = _check_url(current, allowed_hosts, resolve, field)
        location, body = _get(target, current, max_bytes, deadline, timeout_s, field)
        if location is None:
            return body, current
        current = urllib.parse.urljoin(current, location)
    raise ImageError(
        f"{field}: {url!r} redirected more than {MAX_REDIRECTS} times; give the image's final URL",
        param=field,
    )


def _get(
    target: _Target, url: str, max_bytes: int, deadline: float, timeout_s: float, field: str
) -> tuple[str | None, bytes]:
    """One request: ``(location, b"")`` for a redirect, ``(None, body)`` for the image."""
    remaining = deadline - time.monotonic()
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    conn = cls(target, max(remaining, 0.001))
    expired = threading.Event()

    def expire() -> None:
        # A per-recv timeout restarts with every byte; shutting the socket down bounds the
        # whole exchange, headers included, against a server that trickles data.
        expired.set()
        if conn.pinned is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn.pinned, socket.SHUT_RDWR)

    timer = threading.Timer(max(remaining, 0.0), expire)
    timer.daemon = True
    timer.start()
    try:
        conn.request(
            "GET",
            target.path,
            headers={"User-Agent": "edge-vlm", "Accept": "image/*", "Connection": "close"},
        )
        response = conn.getresponse()
        if response.status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise ImageError(
                    f"{field}: {url!r} answered HTTP {response.status} without a Location",
                    param=field,
                )
            return location, b""
        if response.status != 200:
            raise ImageError(
                f"{field}: {url!r} answered HTTP {response.status} {response.reason}; "
                "check that the URL points to an image",
                param=field,
            )
        declared = response.getheader("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > max_bytes:
            raise _too_large(field, url, max_bytes)
        chunks: list[bytes] = []
        total = 0
        while chunk := response.read(min(_CHUNK, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(field, url, max_bytes)
        timer.cancel()
        if expired.is_set():
            raise TimeoutError
        return None, b"".join(chunks)
    except ssl.SSLCertVerificationError as exc:
        raise ImageError(
            f"{field}: TLS certificate of {target.host!r} is not valid ({exc.verify_message})",
            param=field,
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or isinstance(exc, TimeoutError):
            raise ImageError(
                f"{field}: fetching {url!r} took longer than {timeout_s:g}s; "
                "check the server or raise images.fetch_timeout_s",
                param=field,
            ) from exc
        raise ImageError(f"{field}: cannot fetch {url!r}: {exc!r}", param=field) from exc
    finally:
        timer.cancel()
        conn.close()


def _too_large(field: str, url: str, max_bytes: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{field}: {url!r} is larger than the {max_bytes}-byte image limit; "
        "send a smaller image or raise images.max_bytes",
        param=field,
    )
