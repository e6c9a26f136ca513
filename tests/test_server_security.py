"""Safe to leave running: Bearer auth, Host and Origin checks, SSRF, local files, tokens."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edge_vlm.config import ServerSettings
from edge_vlm.errors import ConfigError
from edge_vlm.server.auth import host_allowed, resolve_auth
from tests.server_support import (
    TOKEN,
    ImageServer,
    Running,
    call,
    chat_body,
    data_url,
    isolated_home,
    server_settings,
    serving,
    start_server,
)


@pytest.fixture(scope="module", autouse=True)
def _empty_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with isolated_home(tmp_path_factory.mktemp("home")) as home:
        yield home


CHAT = "/v1/chat/completions"
WAIT = {"x-wait-for-model": "true"}
IMAGE_FIELD = "messages[0].content[0].image_url.url"


@pytest.fixture(scope="module")
def image_server(images: dict[str, Path]) -> Iterator[ImageServer]:
    srv = ImageServer({"/red.png": images["red"].read_bytes()}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def srv(tiny_paths: Any) -> Iterator[Running]:
    """Remote images on, only 127.0.0.1 allowlisted; the model loads on first use."""
    settings = server_settings(tiny_paths, **{
        "images.allow_remote": True, "images.allowed_hosts": ["127.0.0.1"],
        "server.preload": False})
    running = start_server(settings, ready=False)
    yield running
    running.close()


# --- Bearer auth --------------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Basic dGVzdDp0ZXN0", f"Token {TOKEN}", "Bearer wrong-token",
    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
])
def test_missing_or_wrong_token_is_401(srv: Running, images: dict[str, Path],
                                       header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    r = call(srv.port, "POST", CHAT, chat_body(data_url(images["red"])), headers=headers)
    assert r.status == 401
    assert r.error["type"] == "authentication_error" and r.error["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert not srv.app.models.status(), "an unauthenticated request loaded the model"


def test_the_right_token_works_and_the_sdk_reports_401(srv: Running,
                                                       images: dict[str, Path]) -> None:
    ok = call(srv.port, "POST", CHAT, chat_body(data_url(images["red"]), max_tokens=2),
              headers={**srv.auth(), **WAIT})
    assert ok.status == 200, ok.body
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_loopback_without_a_token_has_auth_off(tiny_paths: Any, images: dict[str, Path]) -> None:
    with serving(server_settings(tiny_paths, **{"server.preload": False}), token=None,
                 ready=False) as running:
        r = call(running.port, "POST", CHAT, chat_body(data_url(images["red"]), max_tokens=2),
                 headers=WAIT)
        assert r.status == 200, r.body


# --- Host header (DNS rebinding) and Origin (CORS) ------------------------------------------


@pytest.mark.parametrize("host,allowed", [
    ("evil.example", False), ("evil.example:{port}", False), ("127.0.0.1.nip.io", False),
    ("localhost.evil.example", False), ("", False),
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("LOCALHOST", True),
    ("[::1]:{port}", True), ("api.localhost:{port}", True),
])
def test_host_header_must_name_this_server(srv: Running, host: str, allowed: bool) -> None:
    r = call(srv.port, "GET", "/v1/models",
             headers={**srv.auth(), "Host": host.format(port=srv.port)})
    if allowed:
        assert r.status == 200, r.body
    else:
        assert r.status == 403
        assert r.error["type"] == "permission_error"


def test_host_rules() -> None:
    assert host_allowed("192.168.1.20", "0.0.0.0", [])  # an address cannot be rebound
    assert not host_allowed("192.168.1.20", "127.0.0.1", [])
    assert host_allowed("192.168.1.20", "192.168.1.20", [])
    assert host_allowed("box.lan", "0.0.0.0", ["box.lan"])
    assert not host_allowed("box.lan", "0.0.0.0", [])


def test_cross_origin_requests_are_refused_unless_configured(tiny_paths: Any,
                                                             srv: Running) -> None:
    r = call(srv.port, "GET", "/v1/models",
             headers={**srv.auth(), "Origin": "http://evil.example"})
    assert r.status == 403 and "server.cors_origins" in r.error["message"]
    assert "access-control-allow-origin" not in r.headers
    settings = server_settings(tiny_paths, **{"server.cors_origins": ["http://app.example"],
                                              "server.preload": False})
    with serving(settings, ready=False) as running:
        pre = call(running.port, "OPTIONS", CHAT, headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.status == 204
        assert pre.headers["access-control-allow-origin"] == "http://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"]
        ok = call(running.port, "GET", "/v1/models",
                  headers={**running.auth(), "Origin": "http://app.example"})
        assert ok.status == 200
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        other = call(running.port, "GET", "/v1/models",
                     headers={**running.auth(), "Origin": "http://other.example"})
        assert other.status == 403


# --- SSRF ----------------------------------------------------------------------------------


def _refused(srv: Running, url: str) -> dict[str, Any]:
    r = call(srv.port, "POST", CHAT, chat_body(url), headers=srv.auth())
    assert r.status == 400, (url, r.body)
    assert r.error["param"] == IMAGE_FIELD
    return r.error


@pytest.mark.parametrize("target,what", [
    ("http://127.0.0.2:{port}/red.png?c=2", "loopback"),          # loopback, not allowlisted
    ("http://2130706434:{port}/red.png?c=3", "loopback"),         # 127.0.0.2, decimal
    ("http://0x7f.0.0.2:{port}/red.png?c=4", "loopback"),         # 127.0.0.2, hex
    ("http://[::ffff:127.0.0.2]:{port}/red.png?c=5", "private"),  # IPv4-mapped IPv6
    ("http://[::1]:{port}/red.png?c=6", "loopback"),
    ("http://10.1.2.3/red.png", "private"),
    ("http://192.168.0.1/red.png", "private"),
    ("http://[fd00::1]/red.png", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
    ("http://0.0.0.0:{port}/red.png?c=7", "unspecified"),
    ("http://224.0.0.1/red.png", "multicast"),
])
def test_remote_images_cannot_reach_private_addresses(srv: Running, image_server: ImageServer,
                                                      target: str, what: str) -> None:
    error = _refused(srv, target.format(port=image_server.port))
    assert what in error["message"] and "allowed_hosts" in error["message"]
    assert not [p for p in image_server.requests if "?c=" in p], "the refused URL was fetched"


def test_redirects_to_private_addresses_are_refused(srv: Running,
                                                    image_server: ImageServer) -> None:
    for target in ("http://10.0.0.5/x.png", f"http://127.0.0.3:{image_server.port}/red.png?r=1",
                   "http://[::ffff:10.0.0.1]/x.png", "file:///etc/passwd"):
        _refused(srv, image_server.url(f"/redirect?{target}"))
    assert not [p for p in image_server.requests if "?r=" in p and "redirect" not in p]


def test_an_allowlisted_host_is_fetched(srv: Running, image_server: ImageServer) -> None:
    r = call(srv.port, "POST", CHAT, chat_body(image_server.url("/red.png"), max_tokens=2),
             headers={**srv.auth(), **WAIT})
    assert r.status == 200, r.body
    # A name resolving to the allowlisted address is that address (issue 20).
    by_name = image_server.url("/red.png", host="localhost")
    r = call(srv.port, "POST", CHAT, chat_body(by_name, max_tokens=2),
             headers={**srv.auth(), **WAIT})
    assert r.status == 200, r.body


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "/etc/passwd", "~/.bashrc", "../../etc/hostname",
    "ftp://127.0.0.1/red.png", "gopher://127.0.0.1:70/x",
])
def test_local_files_and_other_schemes_are_refused(srv: Running, url: str) -> None:
    _refused(srv, url)


def test_remote_images_are_off_by_default(tiny_paths: Any, image_server: ImageServer) -> None:
    with serving(server_settings(tiny_paths, **{"server.preload": False}), ready=False) as off:
        before = len(image_server.requests)
        error = _refused(off, image_server.url("/red.png"))
        assert "remote images are off" in error["message"]
        assert len(image_server.requests) == before


def test_local_media_path_allows_files_under_it_only(tiny_paths: Any, images: dict[str, Path],
                                                     tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(images["red"], media / "red.png")
    (media / "escape.png").symlink_to(images["blue"])  # a link out of the folder
    settings = server_settings(tiny_paths, **{
        "server.allowed_local_media_path": str(media), "server.preload": False})
    with serving(settings, ready=False) as running:
        for url in (f"file://{media}/red.png", str(media / "red.png")):
            ok = call(running.port, "POST", CHAT, chat_body(url, max_tokens=2),
                      headers={**running.auth(), **WAIT})
            assert ok.status == 200, ok.body
        for url in (str(images["blue"]), f"file://{media}/escape.png",
                    f"file://{media}/../media/../{images['blue'].parent.name}/blue.png"):
            error = _refused(running, url)
            assert "outside the folders" in error["message"]


def test_clients_cannot_name_model_files(srv: Running, images: dict[str, Path],
                                         tiny_paths: Any) -> None:
    other = str(tiny_paths.model.with_name("other.gguf"))  # the served file itself is fine
    for model in ("/etc/passwd", other, "../x.gguf", "~/model.gguf", "/tmp"):
        r = call(srv.port, "POST", CHAT, {**chat_body(data_url(images["red"])), "model": model},
                 headers=srv.auth())
        assert r.status == 404, model
        assert "does not load model files" in r.error["message"]


# --- binding and tokens -----------------------------------------------------------------------


def test_binding_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a token"):
        resolve_auth(ServerSettings(host="0.0.0.0", token_file=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()
    auth = resolve_auth(ServerSettings(host="0.0.0.0", token="long-enough-token"),
                        token_source="--token")
    assert auth.enabled and "--token" in auth.describe()
    with pytest.raises(ConfigError, match="shorter than 8"):
        resolve_auth(ServerSettings(token="short"))
    assert not resolve_auth(ServerSettings()).enabled


def test_generated_token_is_stored_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "server-token"
    settings = ServerSettings(require_token=True, token_file=str(path))
    first = resolve_auth(settings)
    assert first.token and len(first.token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_auth(settings).token == first.token
    assert resolve_auth(ServerSettings(host="0.0.0.0", require_token=True,
                                       token_file=str(path))).token == first.token
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        resolve_auth(settings)
