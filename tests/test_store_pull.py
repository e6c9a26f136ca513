"""``edge-vlm models pull`` and ``models catalog`` against a stand-in of the Hugging Face
hub's file server on 127.0.0.1 (``HF_ENDPOINT``), through the real huggingface_hub client.

The stand-in answers what ``hf_hub_download`` asks: ``HEAD`` and ``GET`` on
``/{repo}/resolve/{revision}/{file}`` with ``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag``
(the LFS sha256), ``X-Linked-Size`` and ``Range`` requests. It can cut a transfer short
(to test resuming) and serve damaged bytes under the right hash (to test verification),
and it records every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_vlm.gguf.testmodels import TinyVLMPaths
from edge_vlm.store.store import Store
from tests.test_store import cli, store_files

REPO = "test-org/tiny-vlm-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_FILE = "tiny-model-f16.gguf"
MMPROJ_FILE = "mmproj-tiny-f16.gguf"


@dataclass
class Hub:
    """The stand-in hub's files, behaviour switches and request log."""

    files: dict[str, bytes]
    cut: dict[str, int] = field(default_factory=dict)
    """File → bytes to send before dropping the connection (first GET only)."""
    corrupt: set[str] = field(default_factory=set)
    """Files served with one flipped byte, under the hash of the good bytes."""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""

    def gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of a file (None: no Range)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + name)]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _serve(self, body: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            prefix = f"/{REPO}/resolve/main/"
            name = self.path[len(prefix):] if self.path.startswith(prefix) else ""
            if name not in hub.files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = hub.files[name]
            sha = hashlib.sha256(data).hexdigest()
            if name in hub.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and body:
                start = int(rng[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", '"0000000000000000000000000000000000000000"')  # git oid
            self.send_header("X-Linked-Etag", f'"{sha}"')  # LFS: the sha256 of the content
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            cut = hub.cut.pop(name, None) if start == 0 else None
            if cut is not None:
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True  # drop it mid-body
                return
            self.wfile.write(data[start:])

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

    return Handler


@pytest.fixture
def hub(tiny_paths: TinyVLMPaths) -> Iterator[Hub]:
    state = Hub({MODEL_FILE: tiny_paths.model.read_bytes(),
                 MMPROJ_FILE: tiny_paths.mmproj.read_bytes()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


CATALOG = f"""
[models.tiny-hub]
title = "Tiny test VLM"
repo = "{REPO}"
license = "mit"
parameters = "1M"
context = 1024
layers = 2
kv_heads = 2
head_dim = 64
default = "F16"
quants = {{ F16 = {{ file = "{MODEL_FILE}", size_mb = 3 }} }}
mmproj = {{ file = "{MMPROJ_FILE}", size_mb = 0.4 }}

[models.wrong-sha]
title = "Catalog hash that does not match"
repo = "{REPO}"
license = "mit"
default = "F16"
quants = {{ F16 = {{ file = "{MODEL_FILE}", size_mb = 3, sha256 = "{'0' * 64}" }} }}
mmproj = {{ file = "{MMPROJ_FILE}", size_mb = 0.4 }}

[models.not-on-hub]
title = "A file the hub does not have"
repo = "{REPO}"
license = "mit"
default = "Q8_0"
quants = {{ Q8_0 = {{ file = "missing-Q8_0.gguf", size_mb = 3 }} }}
mmproj = {{ file = "{MMPROJ_FILE}", size_mb = 0.4 }}
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: Hub) -> Path:
    """EDGE_VLM_HOME, a test catalog, and huggingface_hub pointed at the stand-in."""
    for key in [k for k in os.environ if k.startswith(("EDGE_VLM_", "HF_"))]:
        monkeypatch.delenv(key)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    monkeypatch.setenv("EDGE_VLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGE_VLM_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("EDGE_VLM_STORE__CHECK_LOAD", "false")
    monkeypatch.setenv("EDGE_VLM_STORE__CATALOG_FILE", str(catalog))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return tmp_path / "home"


def test_pull_downloads_verifies_and_installs(env: Path, hub: Hub, tiny_paths, capsys) -> None:
    rc, out, err = cli(capsys, "pull", "tiny-hub")
    assert rc == 0, err
    assert "installed 'tiny-hub'" in out
    assert [m for m, _, _ in hub.requests].count("GET") == 2

    m = Store.default().get("tiny-hub")
    assert m.source["kind"] == "pull" and m.source["commit"] == COMMIT
    assert m.source["repo"] == REPO and m.license == "mit"
    assert {f.sha256 for f in m.files} == {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (tiny_paths.model, tiny_paths.mmproj)}
    # stored by hard link to huggingface_hub's cache blob: no second copy on disk
    model, _ = Store.default().paths(m)
    cached = next((env.parent / "hf").glob("models--*/snapshots/*/" + MODEL_FILE)).resolve()
    assert model.stat().st_ino == cached.stat().st_ino

    n = len(hub.requests)
    rc, out, _ = cli(capsys, "pull", "tiny-hub")
    assert rc == 0 and "already installed" in out and len(hub.requests) == n


def test_interrupted_download_resumes(env: Path, hub: Hub, tiny_paths, capsys,
                                      monkeypatch) -> None:
    from huggingface_hub import constants

    # huggingface_hub counts what it received per read chunk (10 MB): smaller chunks let a
    # 3 MB file show the resume.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.cut[MODEL_FILE] = 1_000_000
    rc, _, err = cli(capsys, "pull", "tiny-hub")
    assert rc == 0, err
    first, again = hub.gets(MODEL_FILE)
    assert first is None
    assert again == f"bytes={1_000_000 // 65536 * 65536}-"  # the rest, not the whole again
    model, _ = Store.default().paths(Store.default().get("tiny-hub"))
    assert model.read_bytes() == tiny_paths.model.read_bytes()


def test_checksum_mismatch_registers_nothing(env: Path, hub: Hub, capsys) -> None:
    hub.corrupt.add(MMPROJ_FILE)
    rc, _, err = cli(capsys, "pull", "tiny-hub")
    assert rc == 1
    assert "checksum mismatch for mmproj file 'mmproj-tiny-f16.gguf'" in err
    assert "nothing was installed" in err
    files = store_files(env)
    assert files["manifests"] == [] and files["blobs"] == [] and files["tmp"] == []
    # the damaged download is gone from the HF cache; the good one stays
    hf = env.parent / "hf"
    assert not list(hf.glob(f"models--*/snapshots/*/{MMPROJ_FILE}"))
    assert list(hf.glob(f"models--*/snapshots/*/{MODEL_FILE}"))

    hub.corrupt.clear()
    rc, _, err = cli(capsys, "pull", "tiny-hub")
    assert rc == 0, err
    assert len(hub.gets(MODEL_FILE)) == 1 and len(hub.gets(MMPROJ_FILE)) == 2


def test_catalog_sha256_is_checked_too(env: Path, hub: Hub, capsys) -> None:
    rc, _, err = cli(capsys, "pull", "wrong-sha")
    assert rc == 1 and "checksum mismatch for model file" in err
    assert store_files(env)["manifests"] == [] and store_files(env)["blobs"] == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_network_is_one_clear_line(env: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    rc, out, err = cli(capsys, "pull", "tiny-hub")
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "no network connection" in err
    assert (f"edge-vlm models import {MODEL_FILE} --mmproj {MMPROJ_FILE} --name tiny-hub"
            in err)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = cli(capsys, "pull", "tiny-hub")
    assert rc == 1 and "HF_HUB_OFFLINE is set" in err and "models import" in err
    assert store_files(env)["manifests"] == []


def test_offline_pull_uses_files_already_in_the_hf_cache(env: Path, hub: Hub, monkeypatch,
                                                          capsys) -> None:
    assert cli(capsys, "pull", "tiny-hub")[0] == 0
    assert cli(capsys, "rm", "tiny-hub", "--yes")[0] == 0
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    rc, out, err = cli(capsys, "pull", "tiny-hub")
    assert rc == 0, err
    assert "installed 'tiny-hub'" in out


def test_file_missing_on_the_hub(env: Path, hub: Hub, capsys) -> None:
    rc, _, err = cli(capsys, "pull", "not-on-hub")
    assert rc == 1
    assert f"{REPO}/missing-Q8_0.gguf does not exist on the hub" in err
    assert store_files(env)["manifests"] == []


def test_pull_of_unknown_name_points_at_the_catalog(env: Path, capsys) -> None:
    rc, _, err = cli(capsys, "pull", "no-such-model")
    assert rc == 2 and "models catalog" in err


def test_catalog_lists_fit_and_installed(env: Path, hub: Hub, capsys) -> None:
    assert cli(capsys, "pull", "tiny-hub")[0] == 0
    rc, out, _ = cli(capsys, "catalog")
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("tiny-hub "))
    assert "fits" in line and "installed" in line and "mit" in line
    assert any(ln.startswith("smolvlm-256m ") for ln in out.splitlines())  # shipped catalog


def test_shipped_catalog_covers_the_families() -> None:
    from edge_vlm.store.catalog import load_catalog, shipped_catalog_path

    text = shipped_catalog_path().read_text()
    assert "WRITTEN FROM MEMORY" in text
    catalog = load_catalog(extra="")
    names = set(catalog.entries)
    for wanted in ("smolvlm-256m", "smolvlm-500m", "smolvlm-2.2b", "smolvlm2-256m",
                   "smolvlm2-500m", "smolvlm2-2.2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b",
                   "qwen3-vl-2b", "gemma-3-4b", "moondream2", "minicpm-v-2.6",
                   "internvl3-1b", "internvl3-2b", "llava-1.5-7b"):
        assert wanted in names
    for e in catalog.entries.values():
        assert e.default in e.quants and e.repo.count("/") == 1
        assert all(f.file.endswith(".gguf") and f.size > 0 for f in e.quants.values())
        assert "mmproj" in e.mmproj.file and e.mmproj.size > 0
        assert e.kv_bytes_per_token() > 0 and e.context > 0


def test_list_json_after_pull(env: Path, hub: Hub, capsys) -> None:
    assert cli(capsys, "pull", "tiny-hub")[0] == 0
    _, out, _ = cli(capsys, "list", "--json")
    assert [r["name"] for r in json.loads(out) if r["name"] != "shapes-vlm"] == ["tiny-hub"]
    shutil.rmtree(env.parent / "hf")  # the store keeps its own link to the content
    assert cli(capsys, "verify")[0] == 0
