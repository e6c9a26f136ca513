"""``kill -9`` at random points of the real CLI: the model store never shows a half model,
and a resumed batch holds every answer exactly once.

The kill points are drawn from a seeded generator over the measured length of a run, so a
run covers copies in progress, hashing, the child load check and registration (store), and
answers being written (batch).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_vlm.testing import Pair, variant, write_pair

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("EDGE_VLM_FAULT_ROUNDS", "6"))


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_VLM_")}
    env.update(EDGE_VLM_HOME=str(home), EDGE_VLM_CONFIG=str(home / "none.toml"),
               PYTHONPATH=str(ROOT))
    return env


def _cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_vlm.cli", *args], capture_output=True,
                          text=True, env=_env(home), timeout=timeout, stdin=subprocess.DEVNULL,
                          cwd=ROOT)


def _killed_after(cmd: list[str], home: Path, delay: float, *,
                  after_file: Path | None = None) -> int:
    """Start ``cmd``, SIGKILL it ``delay`` seconds later (if still running), counted from
    its start or from when a file matching ``after_file`` (a glob) appears; its exit code."""
    def present() -> set[Path]:
        return set(after_file.parent.glob(after_file.name)) if after_file else set()

    before = present()  # a dead run's leftovers do not count
    proc = subprocess.Popen(cmd, env=_env(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    if after_file is not None:
        deadline = time.monotonic() + 120
        while (proc.poll() is None and time.monotonic() < deadline
               and not present() - before):
            time.sleep(0.001)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=60)


def _installed(home: Path) -> dict[str, dict[str, object]]:
    from edge_vlm.resolve import SHIPPED_MODEL

    listed = _cli(home, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {r["name"]: r for r in json.loads(listed.stdout) if r["name"] != SHIPPED_MODEL}


@pytest.fixture(scope="module")
def larger_pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """A pair large enough (tens of MB) that a kill can land inside a copy."""
    big = variant("generic", text={"n_layer": 12, "n_ff": 2048})  # about 45 MB in F16
    return write_pair(big, tmp_path_factory.mktemp("larger"), prefix="larger-")


def test_kill_9_during_models_import_never_leaves_a_half_model(
        larger_pair: Pair, tmp_path: Path) -> None:
    home = tmp_path / "home"
    base = ["models", "import", str(larger_pair.model), "--mmproj", str(larger_pair.mmproj)]
    cmd = [sys.executable, "-m", "edge_vlm.cli", *base]
    t0 = time.monotonic()
    first = _cli(home, *base, "--name", "measured")
    length = time.monotonic() - t0
    assert first.returncode == 0, first.stderr
    rng = random.Random(21)
    killed = 0
    staging = home / "models" / "tmp" / "*.part"
    for i in range(ROUNDS):
        name = f"k{i}"
        if i % 2:  # anywhere in the run: start-up, hashing, the child load check, registering
            rc = _killed_after([*cmd, "--name", name], home, rng.uniform(0.05, 1.1) * length)
        else:  # while a file is being copied into the store
            rc = _killed_after([*cmd, "--name", name], home, rng.uniform(0.0, 0.08),
                               after_file=staging)
        killed += rc == -signal.SIGKILL
        verify = _cli(home, "models", "verify")
        assert verify.returncode == 0, (i, verify.stdout, verify.stderr)
        models = _installed(home)
        if rc == 0:
            assert name in models
        elif name in models:  # killed after registering: then it is whole
            assert _cli(home, "models", "verify", name).returncode == 0
    assert killed >= ROUNDS // 2, "the kills came too late to test anything"
    # A clean import after all that works, and cleans the leftovers of the dead ones.
    again = _cli(home, *base, "--name", "after")
    assert again.returncode == 0, again.stderr
    assert _cli(home, "models", "verify").returncode == 0
    assert not list((home / "models" / "tmp").glob("*.part"))


def _make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    out = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.new("RGB", (64 + 4 * i, 48), tuple(rng.randrange(256) for _ in "rgb")).save(path)
        out.append(path)
    return out


def test_kill_9_during_batch_then_resume_gives_every_line_once(
        tiny_paths: Pair, tmp_path: Path) -> None:
    home = tmp_path / "home"
    folder = tmp_path / "imgs"
    paths = _make_images(folder, 8)
    out = tmp_path / "out.jsonl"
    prompts = ("What shape?", "How many?")
    cmd = [sys.executable, "-m", "edge_vlm.cli", "batch", str(folder), "-p", prompts[0],
           "-p", prompts[1], "--out", str(out), "--max-tokens", "120", "--temperature", "0",
           "--model", str(tiny_paths.model), "--mmproj", str(tiny_paths.mmproj),
           "--threads", "1", "--no-progress"]
    t0 = time.monotonic()
    whole = _cli(home, *cmd[3:], "--overwrite")
    length = time.monotonic() - t0
    assert whole.returncode == 0, whole.stderr
    out.unlink()
    rng = random.Random(9)
    for _ in range(ROUNDS):
        extra = ["--resume"] if out.exists() else []
        _killed_after([*cmd, *extra], home, rng.uniform(0.2, 0.9) * length)
        if out.exists() and rng.random() < 0.5:
            # A kill in the middle of a write leaves part of a line: cut one short.
            data = out.read_bytes()
            if data.count(b"\n") >= 1:
                cut = rng.randrange(1, 40)
                out.write_bytes(data + data[data.rfind(b"\n", 0, len(data) - 1) + 1:][:cut])
    done = _cli(home, *cmd[3:], *(["--resume"] if out.exists() else []))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    pairs = sorted((Path(r["path"]).name, r["prompt"]) for r in records)
    assert pairs == sorted((p.name, q) for p in paths for q in prompts)
    assert all(r["error"] is None for r in records)
