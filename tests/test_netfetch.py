"""Remote images: address checks, pinning, redirects, caps and timeouts (netfetch)."""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from edge_vlm import netfetch
from edge_vlm.errors import ImageError, ImageTooLargeError, RemoteImageDisabledError
from edge_vlm.image_source import ImagePolicy
from edge_vlm.images import load_image

FIELD = "messages[1].content[0].image_url.url"
buffer = io.BytesIO()
Image.new("RGB", (8, 6), "red").save(buffer, "PNG")
PNG = buffer.getvalue()


# --- fetching --------------------------------------------------------------------------


HOSTS: list[str] = []  # Host headers the test server received


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        HOSTS.append(self.headers["Host"])
        path, _, arg = self.path.partition("?")
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/redirect":
            self._send(302, b"", {"Location": arg})
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif path == "/big":
            self._send(200, b"x" * 5000)
        elif path == "/big-unannounced":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)  # no Content-Length: read until close
            self.close_connection = True
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):  # every byte well within a per-read timeout
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self._send(404, b"nope")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out on purpose leave broken pipes behind


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = ImagePolicy(allow_remote=True, allowed_hosts=("127.0.0.1",), fetch_timeout_s=5.0)


def fetch(url: str, **kwargs: object) -> tuple[bytes, str]:
    options: dict = {"max_bytes": 100_000, "timeout_s": 5.0, "field": FIELD, **kwargs}
    return netfetch.fetch(url, **options)


def test_remote_loopback_refused_unless_allowed(server: str) -> None:
    with pytest.raises(RemoteImageDisabledError, match=r"127\.0\.0\.1, a loopback") as info:
        load_image(f"{server}/img.png", ImagePolicy(allow_remote=True), field=FIELD)
    assert FIELD in str(info.value) and info.value.param == FIELD
    with pytest.raises(RemoteImageDisabledError, match="--allow-host localhost"):
        # The name is resolved and checked; its address is not the allowed one.
        load_image(server.replace("127.0.0.1", "localhost") + "/img.png",
                   ImagePolicy(allow_remote=True, allowed_hosts=("10.9.9.9",)))
    # Allowing an address allows a name that resolves to it (issue 20).
    by_name = load_image(server.replace("127.0.0.1", "localhost") + "/img.png", LOCAL)
    assert by_name.width == 8
    loaded = load_image(f"{server}/img.png", LOCAL, field=FIELD)
    assert (loaded.source_format, loaded.width) == ("PNG", 8)


def test_remote_connects_to_the_checked_address(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    lookups: list[str] = []

    def resolve(host: str, _port: int) -> list[netfetch.IPAddress]:
        lookups.append(host)
        return [ipaddress.IPv4Address("127.0.0.1")]

    # images.test exists nowhere: a second, real DNS lookup would fail.
    url = f"http://images.test:{port}/img.png"
    body, final = fetch(url, allowed_hosts=("images.test",), resolve=resolve)
    assert (body, final, lookups) == (PNG, url, ["images.test"])
    assert HOSTS[-1] == f"images.test:{port}"


def test_resolved_private_address_is_refused() -> None:
    def resolve(host: str, _port: int) -> list[netfetch.IPAddress]:
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.7")]

    with pytest.raises(RemoteImageDisabledError, match=r"10\.0\.0\.7, a private address"):
        fetch("http://rebind.test/img.png", resolve=resolve)


def test_redirects_are_followed_and_rechecked(server: str) -> None:
    allowed = {"allowed_hosts": ("127.0.0.1",)}
    assert fetch(f"{server}/redirect?/img.png", **allowed) == (PNG, f"{server}/img.png")
    for target in ("http://10.0.0.1/x", "http://0x7f.0.0.2:1/", "http://[::1]:1/"):
        with pytest.raises(RemoteImageDisabledError):
            fetch(f"{server}/redirect?{target}", **allowed)
    with pytest.raises(ImageError, match="redirected more than 5 times"):
        fetch(f"{server}/loop", **allowed)
    with pytest.raises(ImageError, match="only http and https"):
        fetch(f"{server}/redirect?ftp://example.com/x.png", **allowed)


@pytest.mark.parametrize("path", ["/big", "/big-unannounced"])
def test_remote_body_is_capped(server: str, path: str) -> None:
    with pytest.raises(ImageTooLargeError, match="1000-byte"):
        fetch(server + path, allowed_hosts=("127.0.0.1",), max_bytes=1000)
    assert len(fetch(server + path, allowed_hosts=("127.0.0.1",), max_bytes=5000)[0]) == 5000


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_remote_timeout_bounds_the_whole_download(server: str, path: str) -> None:
    with pytest.raises(ImageError, match=r"longer than 0\.4s"):
        fetch(server + path, allowed_hosts=("127.0.0.1",), timeout_s=0.4)


def test_remote_failures_are_image_errors(server: str) -> None:
    allowed = {"allowed_hosts": ("127.0.0.1",)}
    with pytest.raises(ImageError, match="HTTP 404"):
        fetch(f"{server}/missing.png", **allowed)
    with pytest.raises(ImageError, match="cannot fetch"):  # TLS against a plain HTTP server
        fetch(server.replace("http:", "https:") + "/img.png", **allowed)
    with pytest.raises(ImageError, match="user name or password"):
        fetch(server.replace("//", "//me:pw@") + "/img.png", **allowed)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(ImageError, match="cannot fetch"):
        fetch(f"http://127.0.0.1:{closed}/img.png", **allowed)


# --- address classification ----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.0x10.1", "10.16.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("[::ffff:7f00:1]", "::ffff:127.0.0.1"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("08.1.1.1", None),
        ("1.2.3.0x", "1.2.3.0"),
        ("[not:an:ip]", None),
    ],
)
def test_ip_host_notations(host: str, want: str | None) -> None:
    got = netfetch.parse_ip_host(host)
    assert got == (ipaddress.ip_address(want) if want else None)


NOT_PUBLIC = [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
    "fc00::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::127.0.0.1",
    "2002:a00:1::1", "64:ff9b::7f00:1", "2001:0:4136:e378:8000:63bf:f5ff:fffe",
]  # fmt: skip


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert not netfetch.is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert netfetch.is_public_address(ipaddress.ip_address(address))


def _render(part: int, style: str) -> str:
    return {"dec": str(part), "hex": hex(part), "oct": "0" + oct(part)[2:]}[style]


@st.composite
def numeric_hosts(draw: st.DrawFn) -> str:
    count = draw(st.integers(1, 4))
    head = draw(st.lists(st.integers(0, 255), min_size=count - 1, max_size=count - 1))
    last = draw(st.integers(0, 256 ** (5 - count)))  # sometimes one too big
    styles = st.sampled_from(["dec", "hex", "oct"])
    return ".".join(_render(part, draw(styles)) for part in [*head, last])


@given(numeric_hosts())
def test_ip_parsing_matches_the_c_resolver(host: str) -> None:
    try:
        want = ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        want = None
    assert netfetch.parse_ip_host(host) == want


@given(st.integers(0, 2**32 - 1))
def test_mapped_ipv4_is_never_more_public(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    assert netfetch.parse_ip_host(str(value)) == v4
    if not netfetch.is_public_address(v4):
        assert not netfetch.is_public_address(mapped)
        assert netfetch.parse_ip_host(f"[{mapped}]") == mapped


@given(st.text(max_size=40))
def test_ip_parsing_never_crashes(host: str) -> None:
    parsed = netfetch.parse_ip_host(host)
    assert parsed is None or isinstance(parsed, ipaddress.IPv4Address | ipaddress.IPv6Address)
