"""``edge-vlm kit build``: one folder that installs edge-vlm and models with no network.

The kit is written into ``OUT.partial-<pid>`` beside ``OUT`` and renamed to ``OUT`` only
when complete: ``kit.json`` and ``SHA256SUMS`` are its last files, so an interrupted build
leaves a folder that no installer accepts, under a name nobody would give it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge_vlm.kit import installer
from edge_vlm.kit.wheels import (
    KitBuildError,
    KitUsageError,
    Wheel,
    backends,
    build_edge_wheel,
    glibc_needed,
    installed_constraints,
    repack_installed,
    repack_size,
    run_pip,
    source_tree,
    wheel_tags,
)
from edge_vlm.store.fsutil import pid_alive

if TYPE_CHECKING:
    from edge_vlm.store.store import Store

LLAMA = "llama-cpp-python"
SELFCHECK_IMAGE = "red-circle-blue-square.png"
SELFCHECK_PROMPT = "Describe the image."
#: What the shipped model answers about its sample (README, tests/test_shipped_model.py).
SELFCHECK_ANSWER = "A red circle on the left and a blue square on the right, on a white background."
_PY_VERSION = re.compile(r"^3\.(\d{1,2})$")
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_")
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_MACOS = re.compile(r"macosx_(\d+)_(\d+)_")


class Steps(Protocol):
    """Receives the progress of a build (the CLI draws rich bars with it)."""

    def step(self, label: str, total: int | None = None) -> None:
        """A new step begins; ``total`` bytes when known, else an indefinite one."""

    def advance(self, n: int) -> None:
        """``n`` more bytes of the current step are done."""

    def note(self, text: str) -> None:
        """A status line for the current indefinite step (e.g. pip's latest line)."""


class _Quiet:
    def step(self, label: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class KitResult:
    """What a build wrote.

    Attributes:
        path: The kit folder.
        manifest: Its ``kit.json``.
        sizes: Bytes by part (``wheels``, ``models``, ``other``).
    """

    path: Path
    manifest: dict[str, Any]
    sizes: dict[str, int] = field(default_factory=dict)


def running_python() -> str:
    """``X.Y`` of this interpreter."""
    return "{}.{}".format(*sys.version_info[:2])


def parse_pythons(text: str | None) -> list[str]:
    """``--python 3.11,3.12`` as a list (default: this Python), checked.

    Raises:
        KitBuildError: a version is not ``3.X`` or is older than edge-vlm needs.
    """
    if not text:
        return [running_python()]
    out: list[str] = []
    for v in (p.strip() for p in text.split(",")):
        m = _PY_VERSION.match(v)
        if not m:
            raise KitUsageError(f"--python {v!r} is not a Python version like 3.12")
        if int(m.group(1)) < 11:
            raise KitUsageError(f"--python {v}: edge-vlm needs Python 3.11 or newer")
        if v not in out:
            out.append(v)
    return out


def _supports(tags: tuple[str, ...], python: str) -> bool:
    """Whether a wheel with these tags installs on CPython ``python`` (same platform)."""
    nodot = python.replace(".", "")
    for tag in tags:
        interp, abi, _plat = tag.split("-")
        for i in interp.split("."):
            if abi == "abi3":  # the stable ABI: built for cp3X, loads on 3.X and later
                if i.startswith("cp3") and i[3:].isdigit() and int(i[3:]) <= int(nodot[1:]):
                    return True
            elif i in {"py3", f"py{nodot}", f"cp{nodot}"} and abi in {"none", f"cp{nodot}"}:
                return True
    return False


def _platform(wheel_paths: list[Path], llama: Path) -> dict[str, Any]:
    """``kit.json``'s platform: where the kit installs (from this machine and its wheels)."""
    host = installer.host_facts()
    plat: dict[str, Any] = {"system": host["system"], "machine": host["machine"],
                            "tag": sorted({t.split("-")[2] for t in _tags_of(llama)})}
    if host["system"] == "Linux":
        need = [(0, 0)]
        glibc = glibc_needed(llama)
        if glibc:
            need.append(installer.version_tuple(glibc)[:2])  # type: ignore[arg-type]
        for p in wheel_paths:
            # a wheel with several manylinux tags installs where the oldest of them does
            mine = [(int(m.group(1)), int(m.group(2))) for m in _MANYLINUX.finditer(p.name)]
            mine += [v for legacy, v in _LEGACY_MANYLINUX.items() if f"{legacy}_" in p.name]
            if mine:
                need.append(min(mine))
        top = max(need)
        plat["libc"] = host["libc"]
        plat["libc_version"] = f"{top[0]}.{top[1]}" if top != (0, 0) else ""
    elif host["system"] == "Darwin":
        versions = [min((int(m.group(1)), int(m.group(2))) for m in _MACOS.finditer(p.name))
                    for p in wheel_paths if _MACOS.search(p.name)]
        if versions:
            plat["macos"] = "{}.{}".format(*max(versions))
    return plat


def _tags_of(wheel: Path) -> tuple[str, ...]:
    parts = wheel.name[:-len(".whl")].split("-")
    interp, abi, plat = parts[-3:]
    return tuple(f"{i}-{a}-{p}" for i in interp.split(".") for a in abi.split(".")
                 for p in plat.split("."))


def _copy_model(store: Store, name: str, dest: Path, steps: Steps) -> dict[str, Any]:
    """Copy an installed store model (hash-checked while copying) into ``dest/name``."""
    from edge_vlm.store.fsutil import CHUNK

    m = store.get(name)
    folder = dest / m.name
    folder.mkdir(parents=True)
    out: dict[str, Any] = {"name": m.name, "license": m.license}
    for role, src in zip(("model", "mmproj"), store.paths(m), strict=True):
        entry = m.file(role)
        filename = Path(entry.filename).name or f"{role}.gguf"
        if role == "mmproj" and filename == Path(out.get("model", "")).name:
            filename = "mmproj-" + filename
        target = folder / filename
        steps.step(f"copying {m.name} {role}", entry.size)
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(target, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                steps.advance(len(chunk))
            fout.flush()
            os.fsync(fout.fileno())
        if entry.sha256 and h.hexdigest() != entry.sha256:
            raise KitBuildError(f"model '{m.name}': its {role} file {src} changed since it was "
                                "installed (edge-vlm models verify shows it); re-import it")
        out[role] = target.relative_to(dest.parent).as_posix()
        out[f"{role}_sha256"] = h.hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    return out


def _wheel_metadata(wheel: Path) -> str:
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        return zf.read(meta).decode("utf-8", "replace") if meta else ""


def _check_extras(extras: list[str]) -> None:
    """Refuse extras edge-vlm does not declare (pip would only warn and leave them out)."""
    import tomllib

    src = source_tree()
    if src is not None:
        project = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))
        have = list(project.get("project", {}).get("optional-dependencies", {}))
    else:
        have = metadata.metadata("edge-vlm").get_all("Provides-Extra") or []
    unknown = [e for e in extras if e not in have]
    if unknown:
        raise KitUsageError(f"--extras: edge-vlm has no extra {', '.join(unknown)}; it has "
                            f"{', '.join(have) or 'none'}")


def _requires_python(wheel: Path) -> str:
    """``3.11`` from a wheel's ``Requires-Python: >=3.11`` ('' if it says otherwise)."""
    text = _wheel_metadata(wheel)
    m = re.search(r"^Requires-Python:\s*>=\s*(3\.\d+)\s*$", text, re.M)
    return m.group(1) if m else ""


def _shipped_entry(edge_wheel: Path) -> dict[str, Any]:
    from edge_vlm.resolve import SHIPPED_MODEL

    return {"name": SHIPPED_MODEL, "shipped": True, "in": f"wheels/{edge_wheel.name}"}


def _collect(requirement: str, wheels: Path, pythons: list[str], steps: Steps) -> None:
    """Put every dependency of ``requirement`` into ``wheels`` for each Python, as wheels."""
    constraints = wheels.parent / ".constraints.txt"
    llama_version = metadata.version(LLAMA)
    for py in pythons:
        steps.step(f"dependencies for Python {py}")
        common = ["--find-links", str(wheels), "--progress-bar", "off"]
        if py == running_python():
            # The versions this install runs with; llama-cpp-python only as the repacked
            # wheel (--only-binary: pip must never try to build it from source).
            constraints.write_text(installed_constraints())
            run_pip(["wheel", "--wheel-dir", str(wheels), *common, "--constraint",
                     str(constraints), "--only-binary", LLAMA, requirement], steps.note)
        else:
            # Another Python: binary wheels only (pip cannot run another Python's builds).
            constraints.write_text(f"{LLAMA}=={llama_version}\n")
            run_pip(["download", "--dest", str(wheels), *common, "--constraint",
                     str(constraints), "--only-binary", ":all:", "--python-version", py,
                     requirement], steps.note)
    constraints.unlink(missing_ok=True)


def _check_llama_kept(wheels: Path, ours: Path, sha: str) -> None:
    """The kit must carry the repacked build, not a llama-cpp-python pip found elsewhere."""
    found = sorted(wheels.glob("llama_cpp_python-*.whl"))
    if found != [ours] or installer.sha256_file(ours) != sha:
        names = ", ".join(p.name for p in found)
        raise KitBuildError(f"pip brought another {LLAMA} wheel ({names}) beside the one "
                            "repacked from this install; the kit would not carry this build")


def _write_sums(root: Path, steps: Steps) -> None:
    files = installer.kit_files(root)
    steps.step("SHA256SUMS", sum((root / r).stat().st_size for r in files))
    lines = []
    for rel in files:
        lines.append(f"{installer.sha256_file(root / rel)}  {rel}\n")
        steps.advance((root / rel).stat().st_size)
    (root / installer.SUMS).write_text("".join(lines), encoding="utf-8")


def _scripts(root: Path, pythons: list[str]) -> None:
    here = Path(__file__).resolve().parent
    shutil.copyfile(here / "installer.py", root / "install.py")
    for name in ("install.sh", "install.ps1"):
        text = (here / name).read_text(encoding="utf-8").replace("@PYTHONS@", " ".join(pythons))
        (root / name).write_text(text, encoding="utf-8", newline="\r\n" if name.endswith(
            ".ps1") else "\n")
    (root / "install.sh").chmod(0o755)


def _readme(manifest: dict[str, Any]) -> str:
    models = ", ".join(m["name"] for m in manifest["models"])
    return (
        f"edge-vlm {manifest['edge_vlm']} offline kit\n"
        f"for Python {' or '.join(manifest['python'])} on {manifest['platform']['system']} "
        f"{manifest['platform']['machine']}; llama.cpp backends: "
        f"{', '.join(manifest['llama_cpp']['backends'])}; models: {models}\n\n"
        "Install (no network, no compiler needed):\n\n"
        "    bash install.sh [--prefix DIR]          # Linux, macOS\n"
        "    powershell -File install.ps1 [-Prefix DIR]   # Windows (untested)\n\n"
        "It checks this folder against kit.json and SHA256SUMS first and refuses a kit for\n"
        "another platform or Python, or with a changed file, before creating anything.\n"
        f"Default DIR: {installer.default_prefix()} (per user).\n"
    )


def build_kit(out: Path, *, models: list[str] | None = None, extras: list[str] | None = None,
              pythons: list[str] | None = None, force: bool = False,
              steps: Steps | None = None, store: Store | None = None) -> KitResult:
    """Build a kit folder at ``out``.

    Args:
        out: The kit folder to create.
        models: Model names (store models, or ``shapes-vlm``/``default`` for the shipped
            one, which travels inside the edge-vlm wheel). None: the shipped one only.
        extras: edge-vlm extras to include (e.g. ``["bench"]``).
        pythons: ``X.Y`` versions to carry wheels for (None: this Python).
        force: Replace ``out`` if it exists.
        steps: Progress receiver.
        store: Where the model names are looked up (the CLI opens it from its settings
            with :func:`edge_vlm.preflight.open_store`; None: the default store).

    Raises:
        KitBuildError: with what to do; nothing is left at ``out``.
    """
    from edge_vlm import __version__
    from edge_vlm.resolve import DEFAULT_NAMES

    steps = steps or _Quiet()
    out = out.expanduser().absolute()
    pythons = pythons or [running_python()]
    extras = sorted({e.strip() for e in extras or [] if e.strip()})
    wanted = list(dict.fromkeys(n.strip().lower() for n in (models or ["default"])))
    _check_extras(extras)
    if out.exists() and not force:
        raise KitUsageError(f"{out} already exists: choose another folder, or pass --force "
                            "to replace it")
    try:
        llama_dist = metadata.distribution(LLAMA)
    except metadata.PackageNotFoundError:
        raise KitBuildError(f"{LLAMA} is not installed in this Python ({sys.executable}); "
                            "a kit carries the build installed here") from None
    tags = wheel_tags(llama_dist)
    for py in pythons:
        if not _supports(tags, py):
            raise KitBuildError(
                f"{LLAMA} is installed here as a {', '.join(tags)} build, which Python {py} "
                f"cannot load; a kit for Python {py} must be built from a Python {py} "
                f"environment where {LLAMA} is installed (it is repacked from there, never "
                "compiled again)")
    from edge_vlm.store.store import Store

    store = store if store is not None else Store.default()
    store_models = [n for n in wanted if n not in DEFAULT_NAMES]
    for name in store_models:
        store.get(name)  # fail before any work if a model is not installed
    _remove_stale_partials(out)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    wheels = partial / "wheels"
    wheels.mkdir(parents=True)
    try:
        steps.step(f"repacking {LLAMA} as installed", repack_size(LLAMA))
        llama: Wheel = repack_installed(LLAMA, wheels, steps.advance)
        steps.step("building the edge-vlm wheel")
        edge_wheel = build_edge_wheel(wheels, steps.note)
        requirement = f"{edge_wheel}[{','.join(extras)}]" if extras else str(edge_wheel)
        llama_sha = installer.sha256_file(llama.path)
        _collect(requirement, wheels, pythons, steps)
        _check_llama_kept(wheels, llama.path, llama_sha)
        entries: list[dict[str, Any]] = []
        if any(n in DEFAULT_NAMES for n in wanted):
            entries.append(_shipped_entry(edge_wheel))
        for name in store_models:
            entries.append(_copy_model(store, name, partial / "models", steps))
        selfcheck = partial / "selfcheck"
        selfcheck.mkdir()
        from edge_vlm.resolve import samples_dir

        shutil.copyfile(samples_dir() / SELFCHECK_IMAGE, selfcheck / SELFCHECK_IMAGE)
        _scripts(partial, pythons)
        wheel_files = sorted(wheels.glob("*.whl"))
        version = __version__
        manifest: dict[str, Any] = {
            "format": installer.FORMAT,
            "edge_vlm": version,
            "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "python": pythons,
            "python_min": _requires_python(edge_wheel),
            "implementation": sys.implementation.name,
            "platform": _platform(wheel_files, llama.path),
            "llama_cpp": {"version": llama.version, "wheel": f"wheels/{llama.path.name}",
                          "tags": list(llama.tags), "backends": backends(llama.path)},
            "extras": extras,
            "requirement": f"edge-vlm[{','.join(extras)}]=={version}" if extras
            else f"edge-vlm=={version}",
            "models": entries,
            "wheels": [w.name for w in wheel_files],
            "selfcheck": {"image": f"selfcheck/{SELFCHECK_IMAGE}", "prompt": SELFCHECK_PROMPT,
                          "expected": SELFCHECK_ANSWER},
        }
        (partial / "README.txt").write_text(_readme(manifest), encoding="utf-8")
        # kit.json, then SHA256SUMS: the files whose absence marks an unfinished kit.
        (partial / installer.KIT_JSON).write_text(json.dumps(manifest, indent=2) + "\n",
                                                  encoding="utf-8")
        _write_sums(partial, steps)
        _fsync_tree(partial)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    sizes = {"wheels": _size(out / "wheels"), "models": _size(out / "models")}
    sizes["other"] = _size(out) - sizes["wheels"] - sizes["models"]
    return KitResult(out, manifest, sizes)


def _size(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync_tree(root: Path) -> None:
    from edge_vlm.fileio import fsync_dir

    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _remove_stale_partials(out: Path) -> None:
    """Delete ``OUT.partial-<pid>`` folders whose build process is gone."""
    for p in out.parent.glob(f"{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)

