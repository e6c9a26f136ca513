"""``edge-vlm kit``: build a real kit of this checkout, install it offline, refuse bad kits.

The kit is built once for the module (``kit`` fixture: the edge-vlm wheel from this source
tree, llama-cpp-python repacked from this venv, the other dependencies through pip and its
cache, never compiling llama.cpp). The tests marked ``slow`` install it into fresh venvs
with the package index disabled and, where this machine allows it (root, ``unshare -n``),
with no network at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from edge_vlm.kit.build import SELFCHECK_ANSWER, build_kit
from edge_vlm.kit.installer import SUMS
from edge_vlm.testing import Pair

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "shapes-vlm" / "samples" / "red-circle-blue-square.png"


def _env(tmp: Path) -> dict[str, str]:
    """A clean environment: no EDGE_VLM_* of the developer, no PYTHONPATH, index off."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGE_VLM_", "PIP_", "VIRTUAL_ENV")) and k != "PYTHONPATH"}
    env.update(EDGE_VLM_HOME=str(tmp / "home"), EDGE_VLM_CONFIG=str(tmp / "no-config.toml"),
               PIP_NO_INDEX="1")
    return env


def _netns_problem() -> str | None:
    """Why ``unshare -n`` cannot cut this process's network here (None: it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: unshare -n needs CAP_SYS_ADMIN"
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n fails here: {probe.stderr.strip()}"
    return None


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_vlm.cli", *args]
    full = dict(env or os.environ)
    full["PYTHONPATH"] = str(ROOT)  # this checkout, not whatever edge-vlm is installed
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=ROOT)


def _install(kit: Path, prefix: Path, tmp: Path, *extra: str,
             python: str | None = None) -> subprocess.CompletedProcess[str]:
    """``bash install.sh``, under ``unshare -n`` when possible, with the index disabled."""
    cmd = ["bash", str(kit / "install.sh"), "--prefix", str(prefix), *extra]
    if python:
        cmd += ["--python", python]
    if _netns_problem() is None:
        cmd = ["unshare", "-n", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), cwd=tmp)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, tiny_paths: Pair) -> Path:
    """A kit of this checkout with the shipped model and one store model (tiny, 3 MB)."""
    base = tmp_path_factory.mktemp("kit")
    pair = tiny_paths
    env = _env(base)
    env.pop("PIP_NO_INDEX")  # building needs pip's index (or its cache)
    env["EDGE_VLM_STORE__CHECK_LOAD"] = "false"
    r = _cli("models", "import", str(pair.model), "--mmproj", str(pair.mmproj), "--name",
             "tiny", env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("kit", "build", str(base / "kit"), "--model", "default", "--model", "tiny",
             env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "kit written" in r.stdout
    return base / "kit"


def _copy(kit: Path, dest: Path) -> Path:
    """A cheap private copy (hard links: replace files, never edit them in place)."""
    shutil.copytree(kit, dest, copy_function=os.link)
    return dest


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _resum(kit: Path, rel: str) -> None:
    """Re-hash one file into SHA256SUMS (to test a check other than the checksum)."""
    digest = hashlib.sha256((kit / rel).read_bytes()).hexdigest()
    lines = [f"{digest}  {rel}" if ln.endswith(f"  {rel}") else ln
             for ln in (kit / SUMS).read_text().splitlines()]
    _replace(kit / SUMS, ("\n".join(lines) + "\n").encode())


def _edit_kit_json(kit: Path, **changes: object) -> None:
    data = json.loads((kit / "kit.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    _replace(kit / "kit.json", json.dumps(data).encode())
    _resum(kit, "kit.json")


def test_kit_layout_carries_this_build(kit: Path) -> None:
    manifest = json.loads((kit / "kit.json").read_text())
    llama = metadata.distribution("llama-cpp-python")
    assert manifest["llama_cpp"]["version"] == llama.version
    assert manifest["python"] == ["{}.{}".format(*sys.version_info[:2])]
    assert "CPU" in manifest["llama_cpp"]["backends"]
    names = {p.name for p in (kit / "wheels").iterdir()}
    assert manifest["llama_cpp"]["wheel"].removeprefix("wheels/") in names
    assert any(n.startswith("edge_vlm-") for n in names)
    for dep in ("numpy", "pillow", "pydantic", "rich", "textual", "huggingface_hub"):
        assert any(n.lower().startswith(dep + "-") for n in names), dep
    assert all(n.endswith(".whl") for n in names)  # nothing to build on the offline side
    assert [m["name"] for m in manifest["models"]] == ["shapes-vlm", "tiny"]
    tiny = manifest["models"][1]
    assert hashlib.sha256((kit / tiny["model"]).read_bytes()).hexdigest() == tiny["model_sha256"]
    listed = {ln.split("  ", 1)[1] for ln in (kit / SUMS).read_text().splitlines()}
    on_disk = {p.relative_to(kit).as_posix() for p in kit.rglob("*") if p.is_file()}
    assert listed == on_disk - {SUMS}
    assert "kit.json" in listed and "install.sh" in listed and "install.py" in listed
    assert not list(kit.parent.glob("kit.partial-*"))


def test_repacked_llama_wheel_is_the_installed_build(kit: Path) -> None:
    """The wheel holds exactly the installed files (so a Metal/CUDA build carries over)."""
    import zipfile

    manifest = json.loads((kit / "kit.json").read_text())
    dist = metadata.distribution("llama-cpp-python")
    with zipfile.ZipFile(kit / manifest["llama_cpp"]["wheel"]) as zf:
        libs = [n for n in zf.namelist() if "/libllama" in n or n.startswith("lib/libllama")]
        assert libs
        for name in libs:
            installed = Path(str(dist.locate_file(name))).read_bytes()
            assert zf.read(name) == installed, name


@pytest.mark.slow
def test_kit_installs_offline_and_the_shipped_model_answers(kit: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "venv"
    r = _install(kit, prefix, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"self-check:  passed ({SELFCHECK_ANSWER!r})" in r.stdout
    edge = prefix / "bin" / "edge-vlm"
    assert f"command:     {edge}" in r.stdout
    env = _env(tmp_path)
    out = subprocess.run([str(edge), "run", "--image", str(SAMPLE), "Describe the image."],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == SELFCHECK_ANSWER
    # the store model came along, imported into this user's store by name
    listed = subprocess.run([str(edge), "models", "list", "--json"], capture_output=True,
                            text=True, env=env)
    assert "tiny" in [m["name"] for m in json.loads(listed.stdout)]
    # the installed llama.cpp is byte for byte the build of this machine
    site = next(prefix.glob("lib/python3*/site-packages"))
    here = Path(str(metadata.distribution("llama-cpp-python").locate_file("lib")))
    for lib in here.glob("libllama.so*"):
        assert (site / "lib" / lib.name).read_bytes() == lib.read_bytes()
    # installing again into the same venv works (an upgrade in place)
    again = _install(kit, prefix, tmp_path, "--no-self-check")
    assert again.returncode == 0, again.stderr
    assert "reusing the venv" in again.stdout
    # the installed (not editable) edge-vlm builds a kit too: it repacks itself as installed
    build_env = _env(tmp_path)
    build_env.pop("PIP_NO_INDEX")
    rebuilt = subprocess.run([str(edge), "kit", "build", str(tmp_path / "again")],
                             capture_output=True, text=True, env=build_env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    import zipfile

    names = []
    for whl in (next((k / "wheels").glob("edge_vlm-*.whl")) for k in (kit, tmp_path / "again")):
        with zipfile.ZipFile(whl) as zf:
            names.append({n for n in zf.namelist() if not n.endswith("/RECORD")})
    assert names[0] == names[1]


def test_install_runs_without_network_here() -> None:
    """The slow install tests cut the network with ``unshare -n``; this says whether they can."""
    problem = _netns_problem()
    if problem:
        pytest.skip(f"installs ran with the package index disabled only ({problem})")
    probe = subprocess.run(["unshare", "-n", sys.executable, "-c",
                            "import socket; socket.getaddrinfo('pypi.org', 443)"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "socket.gaierror" in probe.stderr


@pytest.mark.parametrize(("change", "message"), [
    ({"python": ["3.99"]}, "this kit is for Python 3.99"),
    ({"platform": {"machine": "riscv64"}}, "this kit is for Linux riscv64"),
    ({"platform": {"libc_version": "9.99"}}, "needs glibc 9.99 or newer"),
])
def test_kit_for_another_machine_is_refused_before_anything(
        kit: Path, tmp_path: Path, change: dict[str, object], message: str) -> None:
    if sys.platform != "linux" and "glibc" in message:
        pytest.skip("glibc check is Linux-only")
    bad = _copy(kit, tmp_path / "kit")
    _edit_kit_json(bad, **change)
    prefix = tmp_path / "venv"
    r = _install(bad, prefix, tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "refusing to install" in r.stderr
    assert not prefix.exists() and not (tmp_path / "home").exists()


def test_install_will_not_write_into_a_folder_that_is_not_a_venv(kit: Path,
                                                                 tmp_path: Path) -> None:
    prefix = tmp_path / "documents"
    prefix.mkdir()
    (prefix / "thesis.txt").write_text("mine")
    r = _install(kit, prefix, tmp_path)
    assert r.returncode == 2 and "exists and is not a Python venv" in r.stderr
    assert [p.name for p in prefix.iterdir()] == ["thesis.txt"]


def test_changed_wheel_is_refused_by_install_and_reported_by_verify(
        kit: Path, tmp_path: Path) -> None:
    bad = _copy(kit, tmp_path / "kit")
    wheel = next((bad / "wheels").glob("numpy-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    _replace(wheel, bytes(data))
    prefix = tmp_path / "venv"
    r = _install(bad, prefix, tmp_path)
    assert r.returncode == 2
    assert f"CHANGED: wheels/{wheel.name}" in r.stderr and "not intact" in r.stderr
    assert not prefix.exists()

    (bad / "selfcheck" / "red-circle-blue-square.png").unlink()
    (bad / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    (bad / "wheels" / "._numpy.whl").write_bytes(b"")  # what a Mac leaves on a FAT stick
    v = _cli("kit", "verify", str(bad))
    assert v.returncode == 1
    assert f"CHANGED: wheels/{wheel.name}" in v.stdout
    assert "MISSING: selfcheck/red-circle-blue-square.png" in v.stdout
    assert "EXTRA (not in SHA256SUMS): wheels/evil-1.0-py3-none-any.whl" in v.stdout
    assert "ignored (added by an operating system): wheels/._numpy.whl" in v.stdout
    assert "NOT intact (1 changed, 1 missing, 1 extra)" in v.stderr


def test_verify_of_an_intact_kit_and_of_no_kit(kit: Path, tmp_path: Path) -> None:
    v = _cli("kit", "verify", str(kit))
    assert v.returncode == 0, v.stdout + v.stderr
    assert "intact" in v.stdout and str(len(list(kit.rglob("*.whl")))) != "0"
    (tmp_path / "empty").mkdir()
    v = _cli("kit", "verify", str(tmp_path / "empty"))
    assert v.returncode == 2 and "not a complete edge-vlm kit" in v.stderr


def test_interrupted_build_leaves_nothing_install_accepts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_vlm.kit import build

    def interrupted(root: Path, steps: object) -> None:
        assert (root / "kit.json").is_file()  # all but the checksums were written
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_write_sums", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_kit(tmp_path / "kit")
    assert list(tmp_path.iterdir()) == []  # no kit, no half-written folder

    # a partial folder left by a killed build (its pid is gone): refused, then cleaned up
    partial = tmp_path / "kit.partial-999999999"
    (partial / "wheels").mkdir(parents=True)
    shutil.copy(ROOT / "edge_vlm" / "kit" / "installer.py", partial / "install.py")
    r = subprocess.run([sys.executable, str(partial / "install.py"), "--prefix",
                        str(tmp_path / "venv")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a complete edge-vlm kit" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_existing_output_and_bad_python_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "kit").mkdir()
    r = _cli("kit", "build", str(tmp_path / "kit"))
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    r = _cli("kit", "build", str(tmp_path / "k2"), "--python", "3.10")
    assert r.returncode == 2 and "needs Python 3.11 or newer" in r.stderr
    r = _cli("kit", "build", str(tmp_path / "k2"), "--python", "three")
    assert r.returncode == 2 and "not a Python version" in r.stderr
    r = _cli("kit", "build", str(tmp_path / "k2"), "--extras", "bench,gpu")
    assert r.returncode == 2 and "edge-vlm has no extra gpu; it has " in r.stderr
    assert "bench" in r.stderr.split("it has ")[1]  # the extras that exist are listed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit"]


def test_a_build_another_python_cannot_load_is_refused() -> None:
    from edge_vlm.kit.build import _supports

    assert _supports(("py3-none-linux_x86_64",), "3.12")  # ctypes: any Python 3
    assert _supports(("cp311-abi3-linux_x86_64",), "3.12")
    assert not _supports(("cp311-cp311-linux_x86_64",), "3.12")
    assert _supports(("cp311-cp311-linux_x86_64",), "3.11")


def _other_python() -> str | None:
    """Another CPython 3.11+ on this machine (pyenv shims of absent versions fail: run it)."""
    mine = "{}.{}".format(*sys.version_info[:2])
    candidates = [shutil.which(f"python3.{n}") for n in range(11, 15)]
    candidates += [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.1[1-4]*/bin/"
                                                           "python3.1?"))]
    for c in filter(None, candidates):
        r = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
        v = r.stdout.strip()
        if r.returncode == 0 and v != mine and v >= "3.11":
            return c
    return None


@pytest.mark.slow
def test_kit_for_two_pythons_installs_on_the_other_one(tmp_path: Path) -> None:
    """llama-cpp-python is ctypes (py3-none): one repacked build serves every Python 3."""
    other = _other_python()
    if other is None:
        pytest.skip("no second CPython 3.11+ on this machine")
    version = subprocess.run([other, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    mine = "{}.{}".format(*sys.version_info[:2])
    env = _env(tmp_path)
    env.pop("PIP_NO_INDEX")
    r = _cli("kit", "build", str(tmp_path / "kit"), "--python", f"{mine},{version}", env=env)
    assert r.returncode == 0, r.stderr
    nodot = version.replace(".", "")
    assert any(f"-cp{nodot}-" in p.name for p in (tmp_path / "kit" / "wheels").iterdir())
    prefix = tmp_path / "venv"
    r = _install(tmp_path / "kit", prefix, tmp_path, python=other)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Python {mine}, {version}" in r.stdout and "self-check:  passed" in r.stdout
    assert list(prefix.glob(f"lib/python{version}/site-packages/llama_cpp"))
