"""`edge-vlm serve` as a user runs it: a subprocess, its startup line, Ctrl-C, refusals."""

from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.server_support import call, chat_body, data_url

REPO = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_VLM_")}
    env.update({"EDGE_VLM_CONFIG": str(tmp_path / "absent.toml"),
                "EDGE_VLM_HOME": str(tmp_path / "home"),
                "EDGE_VLM_SERVER__TOKEN_FILE": str(tmp_path / "secret" / "server-token")})
    return env


@contextmanager
def serve(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start ``edge-vlm serve`` and yield it with its first stdout line."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_vlm.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=_env(tmp_path))
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline() if proc.stdout else ""),
                     daemon=True).start()
    try:
        yield proc, lines.get(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _port(line: str) -> int:
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert found, line
    return int(found.group(1))


def test_serve_prints_one_line_serves_and_stops_on_ctrl_c(tiny_paths: Any, tmp_path: Path,
                                                         images: dict[str, Path]) -> None:
    with serve(tmp_path, "--port", "0", "--model", str(tiny_paths.model),
               "--mmproj", str(tiny_paths.mmproj), "--threads", "1") as (proc, line):
        assert line.startswith("edge-vlm serve: listening on http://127.0.0.1:")
        assert "auth off" in line and "/v1" in line
        port = _port(line)
        r = call(port, "POST", "/v1/chat/completions",
                 chat_body(data_url(images["red"]), max_tokens=3),
                 headers={"x-wait-for-model": "true"})
        assert r.status == 200, r.body
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert re.search(r"POST /v1/chat/completions 200 model=tiny-model .*completion_tokens=3",
                     log), log


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "serve", "--host", "0.0.0.0",
                           "--port", "0", "--no-preload"], capture_output=True, text=True,
                          cwd=REPO, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "needs a token" in proc.stderr and "--auth" in proc.stderr
    assert proc.stdout == ""


def test_serve_with_auth_generates_a_private_token(tiny_paths: Any, tmp_path: Path) -> None:
    with serve(tmp_path, "--port", "0", "--auth", "--no-preload", "--model",
               str(tiny_paths.model), "--mmproj", str(tiny_paths.mmproj)) as (proc, line):
        assert "auth on" in line
        path = tmp_path / "secret" / "server-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        port = _port(line)
        token = path.read_text().strip()
        assert call(port, "GET", "/v1/models").status == 401
        ok = call(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert ok.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_serve_help_lists_the_flags(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "serve", "--help"],
                         capture_output=True, text=True, cwd=REPO, env=_env(tmp_path),
                         timeout=120, check=True).stdout
    for flag in ("--host", "--port", "--token", "--model", "--mmproj", "--allow-remote-images",
                 "--allow-host", "--allowed-local-media-path", "--auth"):
        assert flag in out


def test_allow_host_without_remote_images_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "serve", "--allow-host",
                           "10.0.0.5", "--no-preload"], capture_output=True, text=True,
                          cwd=REPO, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and "--allow-remote-images" in proc.stderr

