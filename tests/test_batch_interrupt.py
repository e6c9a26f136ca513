"""`edge-vlm batch` stopped mid-run (SIGKILL, Ctrl+C) and resumed: one line per answer.

Runs the real CLI in a subprocess on the project's tiny random-weight model.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_vlm.testing import Pair
from tests.test_batch import ROOT, lines, make_images, model_flags


def command(paths: Pair, folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_vlm.cli", "batch", str(folder), "-p", "What shape?",
            "-p", "How many?", "--out", str(out), "--max-tokens", "300", "--temperature", "0",
            *model_flags(paths), *extra]


def start_and_wait_for_lines(cmd: list[str], out: Path, n: int,
                             log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return proc
        if proc.poll() is not None:
            pytest.fail(f"the batch ended (rc {proc.returncode}) before {n} answers were "
                        f"written:\n{log.read_text()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {n} answers within 120 s:\n{log.read_text()}")


def test_sigkill_mid_run_then_resume_gives_exactly_one_line_per_answer(
        tiny_paths: Pair, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    paths = make_images(folder, 12, seed=7)
    out = tmp_path / "out.jsonl"
    cmd = command(tiny_paths, folder, out)
    proc = start_and_wait_for_lines(cmd, out, 5, tmp_path / "run1.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    before = out.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 5 <= n_before < 24, "the kill came after the run had finished"
    # A kill can land in the middle of a write: make sure such a torn tail is there.
    with out.open("ab") as f:
        f.write(b'{"path":"' + str(paths[-1]).encode() + b'","image_sha')

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{n_before} answers already there will be skipped" in done.stderr
    assert "torn last line" in done.stderr
    after = out.read_bytes()
    assert after.startswith(complete)  # nothing written before the kill was lost or changed
    got = lines(out)
    pairs = [(Path(r["path"]).name, r["prompt"]) for r in got]
    assert sorted(pairs) == sorted((p.name, q) for p in paths
                                   for q in ("What shape?", "How many?"))
    assert len({r["key"] for r in got}) == 24
    assert all(r["error"] is None for r in got)


def test_ctrl_c_stops_after_the_current_answer_and_resume_completes(
        tiny_paths: Pair, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    make_images(folder, 12, seed=8)
    out = tmp_path / "out.jsonl"
    log = tmp_path / "run1.log"
    cmd = command(tiny_paths, folder, out)
    proc = start_and_wait_for_lines(cmd, out, 3, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    text = log.read_text()
    assert "stopping after the current answer" in text and "--resume" in text
    data = out.read_bytes()
    assert data.endswith(b"\n")
    n = len(lines(out))  # every line is whole JSON
    assert 3 <= n < 24
    assert f"answers: {n} ok" in text  # the summary counts what the file holds
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(lines(out)) == 24 and len({r["key"] for r in lines(out)}) == 24


# -- the shipped model: answers checked against the shapes world -----------------------
