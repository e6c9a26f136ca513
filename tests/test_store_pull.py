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
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from edge_vlm.store.store import Store
from edge_vlm.testing import Pair
from tests.test_store import cli, store_files

REPO = "test-org/tiny-vlm-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_FILE = "tiny-model-f16.gguf"
MMPROJ_FILE = "mmproj-tiny-f16.gguf"


@dataclass
class Hub:
    """The stand-in hub's files, behaviour switches and request log."""

    files: dict[str, bytes]
    """The files of REPO."""
    others: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """Files of other repositories, by repo id."""
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

        def _repo(self, repo: str) -> dict[str, bytes] | None:
            return hub.files if repo == REPO else hub.others.get(repo)

        def _tree(self, repo: str) -> None:
            """``GET /api/models/{repo}/tree/{rev}?recursive=True``: the file list."""
            files = self._repo(repo)
            if files is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps([
                {"type": "file", "path": name, "size": len(data), "oid": "0" * 40,
                 "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                         "pointerSize": 134}}
                for name, data in files.items()]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, body: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            path = urlsplit(self.path).path
            m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/main/?$", path)
            if m and body:
                self._tree(m.group(1))
                return
            m = re.match(r"^/([^/]+/[^/]+)/resolve/main/(.+)$", path)
            files = (self._repo(m.group(1)) if m else None) or {}
            name = m.group(2) if m else ""
            if name not in files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = files[name]
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
def hub(tiny_paths: Pair) -> Iterator[Hub]:
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


def test_shipped_catalog_names_repositories_not_files() -> None:
    from edge_vlm.store.catalog import load_catalog

    catalog = load_catalog(extra="")
    assert {e.repo for e in catalog.entries.values()} == {
        "ggml-org/gemma-3-4b-it-GGUF", "ggml-org/SmolVLM-256M-Instruct-GGUF",
        "ggml-org/SmolVLM-500M-Instruct-GGUF", "ggml-org/SmolVLM2-2.2B-Instruct-GGUF",
        "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF", "ggml-org/Qwen2.5-VL-7B-Instruct-GGUF",
        "ggml-org/InternVL3-1B-Instruct-GGUF", "ggml-org/InternVL3-2B-Instruct-GGUF",
        "ggml-org/pixtral-12b-GGUF", "ggml-org/moondream2-20250414-GGUF"}
    for e in catalog.entries.values():
        assert e.from_file_list and e.default in e.quants, e.name
        assert e.default_file().size > 0 and e.mmproj.size > 0, e.name
        assert e.kv_bytes_per_token() > 0 and e.context > 0, e.name


def test_list_json_after_pull(env: Path, hub: Hub, capsys) -> None:
    assert cli(capsys, "pull", "tiny-hub")[0] == 0
    _, out, _ = cli(capsys, "list", "--json")
    assert [r["name"] for r in json.loads(out) if r["name"] != "shapes-vlm"] == ["tiny-hub"]
    shutil.rmtree(env.parent / "hf")  # the store keeps its own link to the content
    assert cli(capsys, "verify")[0] == 0


# -- choosing files from the repository's list (as llama.cpp's -hf) -----------------------

LISTED = "test-org/listed-vlm-GGUF"
LISTED_CATALOG = f"""
[models.tiny-listed]
title = "Tiny VLM, files from the list"
repo = "{LISTED}"
license = "mit"
parameters = "1M"
context = 1024
layers = 2
kv_heads = 2
head_dim = 64
default = "Q8_0"
size_mb = 3
mmproj_size_mb = 0.4

[models.tiny-auto]
title = "Tiny VLM, llama.cpp's choice"
repo = "{LISTED}"
license = "mit"
default = "auto"

[models.no-projector]
title = "A text-only repository"
repo = "test-org/text-only-GGUF"
license = "mit"
default = "Q8_0"
"""


@pytest.fixture
def listed(env: Path, hub: Hub, tiny_paths) -> Hub:
    """A repository whose files the catalog does not name: two quants, two projectors."""
    model, mmproj = tiny_paths.model.read_bytes(), tiny_paths.mmproj.read_bytes()
    hub.others[LISTED] = {
        "README.md": b"# tiny",
        "imatrix-Q8_0.gguf": b"not a model",
        "tiny-Q8_0.gguf": model,
        "tiny-f16.gguf": model + b"",
        "mmproj-tiny-f16.gguf": mmproj,
        "mmproj-tiny-Q8_0.gguf": mmproj,
    }
    hub.others["test-org/text-only-GGUF"] = {"text-Q8_0.gguf": model}
    catalog = env.parent / "catalog.toml"
    catalog.write_text(catalog.read_text() + LISTED_CATALOG)
    return hub


def test_pull_finds_the_files_in_the_repository_list(listed: Hub, capsys) -> None:
    rc, out, err = cli(capsys, "pull", "tiny-listed")
    assert rc == 0, err
    assert "installed 'tiny-listed'" in out
    assert any(p.startswith(f"/api/models/{LISTED}/tree/main") for _, p, _ in listed.requests)
    m = Store.default().get("tiny-listed")
    assert m.source["files"] == {"model": "tiny-Q8_0.gguf", "mmproj": "mmproj-tiny-Q8_0.gguf"}
    assert m.source["quant"] == "Q8_0"

    rc, out, err = cli(capsys, "pull", "tiny-listed", "--quant", "f16")
    assert rc == 0, err
    m = Store.default().get("tiny-listed-f16")  # the projector closest in bits: f16
    assert m.source["files"] == {"model": "tiny-f16.gguf", "mmproj": "mmproj-tiny-f16.gguf"}

    n = len(listed.requests)
    rc, out, _ = cli(capsys, "pull", "tiny-listed")
    assert rc == 0 and "already installed" in out and len(listed.requests) == n


def test_auto_pulls_what_llama_cpp_would(listed: Hub, capsys) -> None:
    rc, _, err = cli(capsys, "pull", "tiny-auto")  # no Q4_K_M there: Q8_0 next
    assert rc == 0, err
    m = Store.default().get("tiny-auto")
    assert m.source["files"]["model"] == "tiny-Q8_0.gguf" and m.source["quant"] == "Q8_0"


def test_pull_of_a_quant_the_repository_lacks_lists_those_it_has(listed: Hub, capsys) -> None:
    rc, _, err = cli(capsys, "pull", "tiny-listed", "--quant", "Q4_K_M")
    assert rc == 2
    assert f"{LISTED} has no Q4_K_M model file" in err
    assert "quantizations there: Q8_0, F16" in err
    assert "edge-vlm models pull tiny-listed --quant Q8_0" in err
    assert not [r for r in listed.requests if "/resolve/" in r[1]]


def test_pull_of_a_repository_without_mmproj_says_so(env: Path, listed: Hub, capsys) -> None:
    rc, _, err = cli(capsys, "pull", "no-projector")
    assert rc == 1
    assert "test-org/text-only-GGUF has no mmproj file (no vision projector)" in err
    assert store_files(env)["manifests"] == []


def test_offline_pull_lists_the_files_of_the_hf_cache(listed: Hub, monkeypatch, capsys) -> None:
    assert cli(capsys, "pull", "tiny-listed")[0] == 0
    assert cli(capsys, "rm", "tiny-listed", "--yes")[0] == 0
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    rc, out, err = cli(capsys, "pull", "tiny-listed")
    assert rc == 0, err
    assert "installed 'tiny-listed'" in out
    rc, _, err = cli(capsys, "pull", "tiny-listed", "--quant", "F16")
    assert rc == 2 and "quantizations there: Q8_0" in err  # only what is cached


def test_list_based_entry_without_network_says_how_to_do_it_by_hand(listed: Hub, monkeypatch,
                                                                      capsys) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    rc, out, err = cli(capsys, "pull", "tiny-listed")
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert "no network connection" in err
    assert ("download the Q8_0 model GGUF and its mmproj GGUF from "
            f"https://huggingface.co/{LISTED}") in err
    assert "edge-vlm models import FOLDER --name tiny-listed" in err


def test_choices_match_llama_cpp_on_real_repository_layouts() -> None:
    from edge_vlm.store.repofiles import RepoFile, available_quants, find_mmproj, find_model

    def files(*names: str) -> list[RepoFile]:
        return [RepoFile(n) for n in names]

    gemma = files(".gitattributes", "README.md", "gemma-3-4b-it-Q4_K_M.gguf",
                  "gemma-3-4b-it-Q8_0.gguf", "gemma-3-4b-it-f16.gguf", "mmproj-model-f16.gguf")
    assert find_model(gemma, "Q4_K_M").path == "gemma-3-4b-it-Q4_K_M.gguf"
    assert find_model(gemma, "q8_0").path == "gemma-3-4b-it-Q8_0.gguf"  # any case
    assert find_model(gemma, None).path == "gemma-3-4b-it-Q4_K_M.gguf"  # -hf's default
    assert find_model(gemma, "Q4_K") is None  # a tag is matched whole, not as a prefix
    assert find_mmproj(gemma, "gemma-3-4b-it-Q4_K_M.gguf").path == "mmproj-model-f16.gguf"
    assert available_quants(gemma) == ["Q4_K_M", "Q8_0", "F16"]

    smol = files("SmolVLM-256M-Instruct-Q8_0.gguf", "SmolVLM-256M-Instruct-f16.gguf",
                 "mmproj-SmolVLM-256M-Instruct-Q8_0.gguf", "mmproj-SmolVLM-256M-Instruct-f16.gguf")
    assert find_model(smol, None).path == "SmolVLM-256M-Instruct-Q8_0.gguf"
    assert find_mmproj(smol, "SmolVLM-256M-Instruct-Q8_0.gguf").path.endswith("-Q8_0.gguf")
    assert find_mmproj(smol, "SmolVLM-256M-Instruct-f16.gguf").path.endswith("-f16.gguf")

    moon = files("moondream2-mmproj-f16-20250414.gguf", "moondream2-text-model-f16_ct-vicuna.gguf")
    assert find_model(moon, "F16") is None  # no '-F16.' in its name: llama.cpp agrees
    assert find_model(moon, None).path == "moondream2-text-model-f16_ct-vicuna.gguf"
    assert find_mmproj(moon, find_model(moon, None).path).path.startswith("moondream2-mmproj")

    split = files("big-Q4_K_M-00002-of-00002.gguf", "big-Q4_K_M-00001-of-00002.gguf",
                  "sub/mmproj-big-f16.gguf", "mmproj-big-f16.gguf", "mmproj-big-Q8_0.gguf")
    assert find_model(split, "Q4_K_M").path == "big-Q4_K_M-00001-of-00002.gguf"
    # not in a sub-folder the model is not in; the closest bits otherwise (4 -> 8 over 16)
    assert find_mmproj(split, "big-Q4_K_M-00001-of-00002.gguf").path == "mmproj-big-Q8_0.gguf"
    nested = files("q/model-Q8_0.gguf", "mmproj-f16.gguf", "q/mmproj-f16.gguf")
    assert find_mmproj(nested, "q/model-Q8_0.gguf").path == "q/mmproj-f16.gguf"  # deepest
    assert find_mmproj(files("model-Q8_0.gguf", "imatrix.gguf"), "model-Q8_0.gguf") is None
