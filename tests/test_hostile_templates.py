"""Chat templates from model files are untrusted code: one that hangs or exhausts memory
is stopped in process by the sandbox's bounds, refused at load by a probe render in a child
process with hard limits, and refused by ``models import`` with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge_vlm
from edge_vlm.errors import ModelLoadError
from edge_vlm.schema import parse_messages
from edge_vlm.template import ChatTemplate
from edge_vlm.testing import Pair, variant, write_pair

ROOT = Path(__file__).resolve().parent.parent

HOSTILE = {
    "lipsum": "{{ lipsum(n=100000000, html=false, min=100, max=100) }}",
    "center": "{{ 'x' | center(4000000000) }}",
    "ljust": "{{ 'x'.ljust(4000000000) }}",
    "power tower": "{% set x = 2 ** 64 %}{{ x ** 64 ** 64 }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(100) %}"
                "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "format width": "{{ '{:>9999999999}'.format(1) }}",
    "percent width": "{{ '%9999999999d' % 1 }}",
    "replace": "{{ ('x' * 999999) | replace('', 'y' * 999999) }}",
    "indent": "{{ 'a\nb' | indent(4000000000) }}",
    "busy loop": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
                 "{% endfor %}",
}

CONVERSATION = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_templates_are_refused_at_load_by_the_child_probe(source):
    with pytest.raises(ModelLoadError, match="chat template was refused") as info:
        ChatTemplate(source)
    assert len(str(info.value)) < 700  # a reason, not a dump


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_templates_are_stopped_in_process(source):
    template = ChatTemplate(source, check_in_child=False)
    with pytest.raises(ModelLoadError, match="chat template"):
        template.render_prompt(parse_messages(CONVERSATION), "<M>")


def test_an_ordinary_template_passes_and_is_probed_once(monkeypatch, tmp_path):
    from edge_vlm import sandbox

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sandbox, "_checked", set())
    runs: list[str] = []
    real = sandbox._run_child
    monkeypatch.setattr(sandbox, "_run_child",
                        lambda *a: runs.append(a[0]) or real(*a))  # type: ignore[func-returns-value]
    source = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}(ok)"
    for _ in range(3):
        out = ChatTemplate(source).render(parse_messages(CONVERSATION), "<M>")
        assert out == "[user] hi\n(ok)"
    assert runs == [source]
    # Another process (a fresh memory) trusts the marker the first one left.
    monkeypatch.setattr(sandbox, "_checked", set())
    ChatTemplate(source)
    assert runs == [source]
    assert list((tmp_path / "cache").rglob("templates-checked/*"))
    # A refused template leaves no marker.
    with pytest.raises(ModelLoadError):
        ChatTemplate(HOSTILE["center"])
    assert len(list((tmp_path / "cache").rglob("templates-checked/*"))) == 1


def test_a_template_that_refuses_the_probe_by_its_own_rules_is_accepted():
    source = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    ChatTemplate(source)


def _model_with_template(folder: Path, template: str) -> Path:
    """The generic tiny language model with ``template`` as its chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    fam = variant("generic", chat_template=template, text={"n_layer": 1, "n_ctx": 512})
    return write_pair(fam, folder, prefix="hostile-").model


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_with_template(tmp_path_factory.mktemp("hostile"), HOSTILE["center"])


def test_loading_a_model_with_a_hostile_template_fails_with_the_reason(
        hostile_model: Path, tiny_paths: Pair):
    with pytest.raises(ModelLoadError, match="argument 4000000000 is too large"):
        edge_vlm.load(hostile_model, tiny_paths.mmproj, threads=1)


def _run_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_VLM_")}
    env.update(EDGE_VLM_HOME=str(home), EDGE_VLM_CONFIG=str(home / "none.toml"),
               PYTHONPATH=str(ROOT))
    return env


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_vlm.cli", *args], capture_output=True,
                          text=True, env=_run_env(home), timeout=300, stdin=subprocess.DEVNULL)


def test_models_import_refuses_a_hostile_template_naming_the_reason(
        hostile_model: Path, tiny_paths: Pair, tmp_path: Path):
    home = tmp_path / "home"
    proc = _run(home, "models", "import", str(hostile_model), "--mmproj",
                str(tiny_paths.mmproj), "--name", "hostile")
    assert proc.returncode != 0
    assert "chat template was refused" in proc.stderr
    assert "argument 4000000000 is too large" in proc.stderr
    listed = _run(home, "models", "list")
    assert "hostile" not in listed.stdout
    good = _run(home, "models", "import", str(tiny_paths.model), "--mmproj",
                str(tiny_paths.mmproj), "--name", "fine")
    assert good.returncode == 0, good.stderr
    assert "fine" in _run(home, "models", "list").stdout


def test_the_child_limits_are_hard():
    """What the in-process bounds do not foresee meets the child's RLIMIT_AS and RLIMIT_CPU."""
    code = ("from edge_vlm import sandbox; sandbox._limit_child()\n"
            "try:\n    b = bytearray(2 * 1024 ** 3)\nexcept MemoryError:\n    print('refused')\n"
            "import resource; print(resource.getrlimit(resource.RLIMIT_CPU)[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    from edge_vlm.sandbox import CHILD_CPU_SECONDS

    assert proc.stdout.split() == ["refused", str(CHILD_CPU_SECONDS)], proc.stderr


@pytest.mark.parametrize("source", [
    "{{ '%s * %s = %d' % ('a', 'b', 1234567) }}",
    "{{ 'call 1234567890 {}'.format('now') }}",
    "{{ '%-10s|' % 'x' }}{{ '{:>8}'.format('y') }}",
])
def test_ordinary_formatting_is_not_mistaken_for_an_attack(source):
    ChatTemplate(source).render(parse_messages(CONVERSATION), "<M>")


def test_serve_reports_a_hostile_template_instead_of_loading_forever(
        hostile_model: Path, tiny_paths: Pair, tmp_path: Path):
    import socket
    import time

    from tests.server_support import call

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = _run_env(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_vlm.cli", "serve", "--model", str(hostile_model),
         "--mmproj", str(tiny_paths.mmproj), "--port", str(port)],
        env={**env, "EDGE_VLM_STORE__CHECK_LOAD": "false"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        while True:
            assert time.monotonic() < deadline, "still loading after 120 s"
            try:
                reply = call(port, "POST", "/v1/chat/completions", body, timeout=60)
            except OSError:
                time.sleep(0.3)
                continue
            if reply.status != 503:
                break
            time.sleep(0.3)
        assert reply.status != 200
        assert "argument 4000000000 is too large" in reply.error["message"]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
