"""The ``edge-vlm`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

EXE = [sys.executable, "-m", "edge_vlm.cli"]


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return subprocess.run([*EXE, *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def model_args(tiny_paths) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--model", str(tiny_paths.model), "--mmproj", str(tiny_paths.mmproj),
            "--threads", "1"]


def test_help_does_not_import_llama_cpp_or_textual():
    code = ("import sys; from edge_vlm.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('llama_cpp', 'textual', 'numpy', 'PIL') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "run" in out.stdout and "info" in out.stdout


def test_run_streams_an_answer(model_args, images):
    out = run("run", *model_args, "--image", str(images["red"]), "--max-tokens", "6",
              "--stats", "What is this?")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) >= 3
    assert "stats: ttft" in out.stderr and "16 tok" in out.stderr
    assert "1 tile (1 encoded)" in out.stderr  # tiles and encoder passes per image


def test_run_json_is_a_chat_completion(model_args, images):
    out = run("run", *model_args, "--image", str(images["blue"]), "--max-tokens", "4",
              "--json", "What is this?")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] == 4
    assert data["usage"]["prompt_tokens"] > 16


def test_prompt_from_stdin(model_args, images):
    out = run("run", *model_args, "--image", str(images["red"]), "--max-tokens", "3",
              stdin="What is this?\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_missing_image_is_one_line_and_exit_2(model_args):
    out = run("run", *model_args, "--image", "/nonexistent/cat.png", "hi")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-vlm: error:")
    assert "cat.png" in lines[0] and "Traceback" not in out.stderr


def test_context_overflow_exit_2(model_args, images):
    out = run("run", *model_args, "--image", str(images["red"]), "--max-tokens", "100000",
              "hi")
    assert out.returncode == 2 and "context holds" in out.stderr


def test_mismatched_pair_exit_2(tiny_paths, mismatched_mmproj):
    out = run("run", "--model", str(tiny_paths.model), "--mmproj", str(mismatched_mmproj), "hi")
    assert out.returncode == 2 and "512" in out.stderr and "256" in out.stderr


def test_bad_setting_in_environment_is_a_clear_error(model_args):
    out = run("run", *model_args, "hi", env={"EDGE_VLM_RUNTIME__N_BATCH": "two"})
    assert out.returncode == 2
    assert "runtime.n_batch" in out.stderr and "EDGE_VLM_RUNTIME__N_BATCH" in out.stderr


def test_info_reports_backends_and_config(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[runtime]\nthreads = 3\n")
    out = run("info", env={"EDGE_VLM_CONFIG": str(cfg), "EDGE_VLM_SAMPLING__MAX_TOKENS": "77"})
    assert out.returncode == 0, out.stderr
    assert "backends: CPU" in out.stdout
    assert f"config file: {cfg} (read)" in out.stdout
    assert "EDGE_VLM_SAMPLING__MAX_TOKENS" in out.stdout
    assert '"threads": 3' in out.stdout and '"max_tokens": 77' in out.stdout


def test_eval_runs_the_shapes_world_from_the_checkout(tiny_paths):
    out = run("eval", "--scenes", "1", "--model", str(tiny_paths.model), "--mmproj",
              str(tiny_paths.mmproj), "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "| run | shape |" in out.stdout and "tiny-model png" in out.stdout


def test_eval_without_the_training_code_says_where_it_lives(monkeypatch, capsys, tmp_path):
    from edge_vlm import cli, shipped

    monkeypatch.setattr(shipped, "training_dir", lambda: tmp_path / "nowhere")
    assert cli.main(["eval", "--scenes", "1"]) == 1
    err = capsys.readouterr().err
    assert "models/shapes-vlm/training" in err and "source checkout" in err
