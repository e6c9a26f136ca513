"""The real ``edge-vlm chat`` command in a real terminal: tmux, send-keys, capture-pane."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (apt-get install -y tmux; .ci/run installs it)")


class Tmux:
    """One tmux server on its own socket, so the user's tmux is never touched."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["tmux", "-S", str(self.socket), "-f", os.devnull, *args],
                              capture_output=True, text=True, timeout=30, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "chat", check=False)

    def wait_for(self, condition: Callable[[str], bool], what: str, timeout: float = 120.0) -> (
            str):
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if condition(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen was:\n{text}")

    def pane_dead(self) -> bool:
        """Whether the program in the pane has exited (the pane stays: remain-on-exit)."""
        out = subprocess.run(["tmux", "-S", str(self.socket), "list-panes", "-t", "chat", "-F",
                              "#{pane_dead}"], capture_output=True, text=True, check=False)
        return out.returncode != 0 or out.stdout.strip() == "1"

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-S", str(self.socket), "has-session", "-t", "chat"],
                              capture_output=True, check=False).returncode == 0


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    # A short private folder: socket paths are limited to ~100 bytes.
    folder = Path(tempfile.mkdtemp(prefix="evlm-tmux-"))
    t = Tmux(folder / "s")
    yield t
    t("kill-server", check=False)
    shutil.rmtree(folder, ignore_errors=True)


def _command() -> list[str]:
    script = Path(sys.executable).with_name("edge-vlm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edge_vlm.cli"]


def test_edge_vlm_chat_answers_in_a_real_terminal(tmux, tmp_path, tiny_paths, images):
    home = tmp_path / "home"
    env = {
        "EDGE_VLM_HOME": str(home),
        "EDGE_VLM_CONFIG": str(tmp_path / "no-config.toml"),
        "EDGE_VLM_SAMPLING__MAX_TOKENS": "8",
        "EDGE_VLM_RUNTIME__THREADS": "1",
        "TERM": "xterm-256color",
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *_command(), "chat",
            "--model", str(tiny_paths.model), "--mmproj", str(tiny_paths.mmproj),
            "--image", str(images["red"])]
    tmux("new-session", "-d", "-s", "chat", "-x", "80", "-y", "24", shlex.join(argv))
    tmux("set-option", "-t", "chat", "remain-on-exit", "on")

    tmux.wait_for(lambda s: "ready" in s and "red.png" in s, "the model and the image chip")
    tmux("send-keys", "-t", "chat", "-l", "What is this?")
    tmux("send-keys", "-t", "chat", "Enter")
    screen = tmux.wait_for(lambda s: "ttft" in s and "tok/s" in s, "the answer's stats line")
    lines = screen.splitlines()
    role = next(i for i, line in enumerate(lines) if line.strip() == "tiny-model")
    stats = next(i for i, line in enumerate(lines) if "ttft" in line)
    answer = " ".join(line.strip() for line in lines[role + 1:stats]).strip()
    assert answer, f"no answer between the model name and the stats:\n{screen}"
    assert "What is this?" in screen

    tmux("send-keys", "-t", "chat", "C-q")
    tmux.wait_for(lambda s: "Pane is dead" in s or tmux.pane_dead(), "the app to quit",
                  timeout=60)
    saved = list((home / "conversations").glob("*.json"))
    assert len(saved) == 1 and "What is this?" in saved[0].read_text()
